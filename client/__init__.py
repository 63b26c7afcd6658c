"""Flower ClientApp for fedllm: thin wiring over the `fedllm` library."""
