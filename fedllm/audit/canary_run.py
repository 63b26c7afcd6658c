"""`fedllm audit canary`: the one-run empirical audit as an experiment.

The clients of the configured experiment are written to `RUN_DIR/audit/data/` as a
data folder, each with its included canaries among its *training* records, and the
experiment runs unchanged on that folder (`data.path`): the audited code path is the
real one, and clients never learn which records are canaries.

The adversary is the one the record-level guarantee is stated against: whoever sees
what a device sends. An observer wrapped around the real ClientApp keeps each train
reply's adapter delta exactly as it leaves the device (`audit/updates/`), with the
global adapter it answered. A canary's score is how much its loss falls under its own
client's updates beyond how much it falls under other clients' updates (see `score`).
"""

from __future__ import annotations

import json
import secrets
import statistics
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedllm import atomic
from fedllm import messages as wire
from fedllm.audit.canary import epsilon_lower_bound, guess, make_canaries, record_losses
from fedllm.errors import ConfigError
from fedllm.personal import load_state, save_state
from fedllm.simulate import component, load_experiment, simulate
from fedllm.state import safe_name

CONFIDENCE = 0.95

observer = ClientApp()


def _keep_update(msg: Message, reply: Message) -> None:
    """Store the delta a train reply carries, and the global adapter it answered."""
    if reply.has_error() or wire.ARRAYS not in reply.content.array_records:
        return  # an error or a decline: nothing left the device
    config = msg.content[wire.CONFIG]
    folder = Path(str(config["run-dir"])) / "audit" / "updates" / f"round-{int(config[wire.SERVER_ROUND])}"
    client = safe_name(str(reply.content[wire.CLIENT][wire.CLIENT_ID]))
    save_state(folder / "deltas" / f"{client}.safetensors", reply.content[wire.ARRAYS].to_torch_state_dict())
    if not (folder / "global.safetensors").exists():
        save_state(folder / "global.safetensors", msg.content[wire.ARRAYS].to_torch_state_dict())


def _device(msg: Message, context: Context) -> Message:
    """The real ClientApp, loaded as `flwr run` loads it (the `clientapp` component)."""
    return component("clientapp")(msg, context)


@observer.train()
def _train(msg: Message, context: Context) -> Message:
    reply = _device(msg, context)
    _keep_update(msg, reply)
    return reply


@observer.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    return _device(msg, context)


@observer.query()
def _query(msg: Message, context: Context) -> Message:
    return _device(msg, context)


def write_canary_data(config, folder: Path, m: int, seed: int) -> list[dict[str, Any]]:
    """One .jsonl per client (training records first, held-out records last, as the
    folder loader splits them); returns the canaries with client and inclusion."""
    import random

    from fedllm.data import load_clients
    from fedllm.data.corpus import clients_from_folder

    rng = random.Random(seed)
    clients = load_clients(config)
    texts = make_canaries(m, rng)
    canaries = [{"index": i, "text": t, "client": rng.choice(clients).client_id, "included": rng.random() < 0.5}
                for i, t in enumerate(texts)]
    folder.mkdir(parents=True, exist_ok=True)
    for c in clients:
        items = [(x["text"], True) for x in canaries if x["client"] == c.client_id and x["included"]]
        items += [(t, False) for t in c.train]
        rng.shuffle(items)
        # The folder loader holds out the file's last records, more of them as the file
        # grows: move that many original records, never a canary, to the end.
        extra = round((len(items) + len(c.heldout)) * config.data.holdout_fraction) - len(c.heldout)
        if extra > 0:
            tail = set([i for i, (_, canary) in enumerate(items) if not canary][-extra:])
            items = [it for i, it in enumerate(items) if i not in tail] + [items[i] for i in sorted(tail)]
        lines = [t for t, _ in items] + list(c.heldout)
        atomic.write_bytes(folder / f"{c.client_id}.jsonl",
                           "".join(json.dumps({"text": t}) + "\n" for t in lines).encode())
    loaded = {c.client_id: set(c.train) for c in clients_from_folder(folder, config.data.min_records,
                                                                      config.data.holdout_fraction)}
    lost = [x["index"] for x in canaries if x["included"] and x["text"] not in loaded.get(x["client"], ())]
    if lost:
        raise RuntimeError(f"canaries {lost[:5]} did not land in their clients' training records")
    return canaries


def score(run_dir: Path, config, canaries: list[dict[str, Any]]) -> tuple[list[float], list[int]]:
    """(score, updates scored) per canary.

    Per round: how much the canary's loss fell under its own client's update, minus how
    much it fell, on average, under the other clients' updates of that round (they never
    held it: that is what any update teaches about a canary like it). Summed over the
    client's updates, then centred on the median of that client's canaries.
    """
    from fedllm.data.tokens import encode
    from fedllm.model import attach_lora, load_adapter_state, load_base, resolve_base

    base, tokenizer = load_base(resolve_base(config, progress=False))
    model = attach_lora(base, config.lora, config.seed)
    examples = encode(tokenizer, [c["text"] for c in canaries], config.model.max_length)
    by_client: dict[str, list[int]] = {}
    for c in canaries:
        by_client.setdefault(safe_name(c["client"]), []).append(c["index"])
    raw, updates = [0.0] * len(canaries), [0] * len(canaries)
    for folder in sorted((run_dir / "audit" / "updates").glob("round-*")):
        global_state = load_state(folder / "global.safetensors")
        load_adapter_state(model, global_state)
        before = record_losses(model, examples, tokenizer.pad_token_id)
        drops: dict[str, list[float]] = {}
        for update in sorted((folder / "deltas").glob("*.safetensors")):
            delta = load_state(update)
            load_adapter_state(model, {k: global_state[k] + delta[k] for k in global_state})
            after = record_losses(model, examples, tokenizer.pad_token_id)
            drops[update.stem] = [b - a for b, a in zip(before, after)]
        for client, drop in drops.items():
            others = [d for other, d in drops.items() if other != client]
            for i in by_client.get(client, []):
                raw[i] += drop[i] - (statistics.fmean(d[i] for d in others) if others else 0.0)
                updates[i] += 1
    scores = list(raw)
    for mine in by_client.values():
        centre = statistics.median(raw[i] for i in mine)
        for i in mine:
            scores[i] = raw[i] - centre
    return scores, updates


def run(config_path: Path | None, overrides: dict[str, Any], run_dir: Path, m: int = 1000,
        r: int | None = None, seed: int | None = None) -> dict[str, Any]:
    if m < 2:
        raise ConfigError(f"--canaries={m}: give at least 2 canaries (hundreds give a useful bound)")
    r = r if r is not None else max(2, (m // 10) // 2 * 2)
    if not 2 <= r <= m or r % 2:
        raise ConfigError(f"--guesses={r}: give an even number between 2 and --canaries ({m})")
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(f"--run-dir {run_dir} is not empty; a canary audit needs a fresh run directory "
                          "(updates of an earlier run would be scored with this one's)")
    seed = secrets.randbits(32) if seed is None else seed
    config = load_experiment(config_path, {**overrides, "run-dir": str(run_dir)})
    data = run_dir / "audit" / "data"
    canaries = write_canary_data(config, data, m, seed)
    audited = config.with_values({"data.path": str(data)})
    summary = simulate(audited, run_dir, client_app=f"{__name__}:observer")

    scores, updates = score(run_dir, audited, canaries)
    guesses = guess(scores, [c["included"] for c in canaries], r)
    delta = audited.privacy.delta
    privacy = summary.get("privacy", {})
    claimed = (privacy.get("epsilon") or {}).get("max") if audited.privacy.enabled else None
    result = {
        "m": m, "guesses": guesses.made, "correct": guesses.correct,
        "claimed_epsilon": claimed, "epsilon_lower_bound": epsilon_lower_bound(m, guesses.made, guesses.correct,
                                                                              delta, CONFIDENCE),
        "confidence": CONFIDENCE, "delta": delta, "included": sum(c["included"] for c in canaries),
        "privacy_enabled": audited.privacy.enabled, "seed": seed,
        "scored_on": "each update the canary's client sent: loss under the global adapter minus loss under "
                     "global + delta, less the same drop averaged over the round's other updates; summed over "
                     "its client's updates, centred on the median of its client's canaries",
        "canaries": [{**c, "score": s, "updates": u, "guess": g}
                     for c, s, u, g in zip(canaries, scores, updates, guesses.guess)],
    }
    atomic.write_json(run_dir / "audit" / "canary.json", result)
    return result


def format_result(result: dict[str, Any]) -> str:
    claimed = result["claimed_epsilon"]
    verdict = ("no claim (DP off)" if claimed is None else
               "consistent with the claim" if result["epsilon_lower_bound"] <= claimed else
               "LOWER BOUND ABOVE THE CLAIM: the implementation leaks more than it reports")
    return (f"canary audit: m={result['m']} canaries ({result['included']} included), {result['guesses']} guesses, "
            f"{result['correct']} correct\n"
            f"epsilon lower bound at {result['confidence']:.0%} confidence: {result['epsilon_lower_bound']:.3f}; "
            f"claimed epsilon: {'none' if claimed is None else f'{claimed:.3f}'} -> {verdict}")
