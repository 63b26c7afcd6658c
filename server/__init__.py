"""Flower ServerApp for fedllm: strategy wiring, reply validation, run directory."""
