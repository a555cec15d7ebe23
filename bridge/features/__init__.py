"""Falcon-H1 features beyond plain weights: BitNet packing, µP folding, Mamba group expansion."""
