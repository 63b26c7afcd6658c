"""Experiment definitions (TOML) and the runner behind `fedllm simulate`."""
