"""fedllm: federated personalisation of small causal language models with LoRA."""

import os

# fedllm runs offline: never reach for a model hub unless the user asks for it explicitly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

__version__ = "0.1.0"
