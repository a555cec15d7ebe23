"""Checkpoint formats: detection, HF safetensors, legacy Megatron rank files, torch_dist, run configs."""
