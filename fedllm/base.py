"""The built-in base model: a small LLaMA-architecture causal LM and a byte-level BPE
tokenizer, trained by fedllm on the *public* plays only, so that fedllm works offline.

The recipe is plain data; its hash names the cache directory, so a changed recipe
builds a new model and an unchanged one is reused. The result is a normal Hugging Face
model directory: `AutoModelForCausalLM.from_pretrained(path)` loads it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
RECIPE_FILE = "fedllm-base-recipe.json"


@dataclass(frozen=True)
class BaseRecipe:
    vocab_size: int = 4096
    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    seq_len: int = 128
    steps: int = 400
    batch_size: int = 16
    lr: float = 3e-3
    seed: int = 0
    public_fraction: float = 0.5
    split_seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"format": 1, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    """`$FEDLLM_CACHE`, else `$XDG_CACHE_HOME/fedllm`, else `~/.cache/fedllm`."""
    if os.environ.get("FEDLLM_CACHE"):
        return Path(os.environ["FEDLLM_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedllm"


def base_dir(recipe: BaseRecipe, cache_dir: Path) -> Path:
    return cache_dir / f"base-{recipe.key()}"


def is_built(path: Path) -> bool:
    return (path / RECIPE_FILE).is_file()


@contextlib.contextmanager
def _lock(path: Path):
    """Several simulation workers may ask for the base at once: one builds, others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_base(recipe: BaseRecipe, cache_dir: Path | None = None, progress: bool = True) -> Path:
    """Return the directory of the built-in base for `recipe`, building it if needed."""
    cache_dir = cache_dir or default_cache_dir()
    target = base_dir(recipe, cache_dir)
    if is_built(target):
        return target
    with _lock(cache_dir / f".base-{recipe.key()}.lock"):
        if not is_built(target):
            build_base(recipe, target, progress=progress)
    return target


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[BOS, EOS, PAD], show_progress=False
    )
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)


def model_config(recipe: BaseRecipe, tokenizer):
    from transformers import LlamaConfig

    intermediate = 64 * math.ceil(recipe.hidden_size * 8 / 3 / 64)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.heads,
        max_position_embeddings=max(512, recipe.seq_len),
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def build_base(recipe: BaseRecipe, target: Path, progress: bool = True) -> Path:
    """Train tokenizer and model on the public plays and save them at `target`."""
    from transformers import LlamaForCausalLM

    from fedllm.data.corpus import embedded_split, public_texts

    started = time.time()
    public, _ = embedded_split(recipe.public_fraction, recipe.split_seed)
    texts = public_texts(public)
    tokenizer = train_tokenizer(texts, recipe.vocab_size)

    ids: list[int] = []
    for encoded in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        ids.extend([tokenizer.bos_token_id, *encoded, tokenizer.eos_token_id])
    stream = torch.tensor(ids, dtype=torch.long)

    torch.manual_seed(recipe.seed)
    model = LlamaForCausalLM(model_config(recipe, tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.1, betas=(0.9, 0.95))
    warmup = max(1, recipe.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / recipe.steps))),
    )
    generator = torch.Generator().manual_seed(recipe.seed)
    model.train()
    bar = tqdm(range(recipe.steps), desc="building built-in base model", disable=not progress, unit="step")
    for _ in bar:
        starts = torch.randint(0, len(stream) - recipe.seq_len - 1, (recipe.batch_size,), generator=generator)
        batch = torch.stack([stream[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    model.eval()
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    info = {"recipe": asdict(recipe), "tokens": len(ids), "final_loss": loss.item(),
            "seconds": round(time.time() - started, 1), "public_plays": [p.slug for p in public]}
    (staging / RECIPE_FILE).write_text(json.dumps(info, indent=2))
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    return target
