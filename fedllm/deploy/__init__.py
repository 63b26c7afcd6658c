"""Running fedllm on real machines: certificates, the server and the device daemon,
all on Flower's deployment engine (SuperLink, SuperNodes)."""
