"""Compression of trained models: structured pruning to a MAC budget (``prune``), quantization."""
