"""falcon-h1-bridge: exact, streaming Falcon-H1 conversion between Hugging Face and Megatron."""

__version__ = "0.1.0"
