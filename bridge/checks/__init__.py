"""Checks on checkpoints: verify, logits parity with an independent forward, inspect."""
