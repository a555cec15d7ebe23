"""falcon-h1-bridge: exact, streaming Falcon-H1 conversion between Hugging Face and Megatron."""

from bridge.families import (
    falcon_h1,  # noqa: F401  registers the Falcon-H1 family
    llama,  # noqa: F401  registers the Llama (Falcon3, Falcon-E) family
)

__version__ = "0.1.0"
