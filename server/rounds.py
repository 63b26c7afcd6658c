"""The server's round loop: sample, train, validate, aggregate, checkpoint, evaluate.

Flower's `Strategy.start` runs all rounds in one call; fedllm needs to act between the
steps of a round (drop bad replies, write the run directory), so it drives the
strategy's `configure_train` / `aggregate_train` itself, one round at a time.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from tqdm.auto import tqdm

from fedllm import atomic
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.evaluate import METRICS, SUMMARY_METRICS
from fedllm.model import adapter_state, attach_lora, base_model_bytes, load_base, resolve_base, save_adapter
from fedllm.personal import load_state, save_state
from fedllm.plots import finish, format_summary
from fedllm.privacy.report import summarize
from fedllm.privacy.user_level import UserLevel
from fedllm.rundir import RunDir
from fedllm.state import safe_name
from fedllm.untrusted import MAX_TEXT, say
from server.resume import (check_server_state, config_changes, load_strategy, read_genesis_registry, read_json,
                           save_strategy)
from server.sampling import ClientSampler, NodeInfo, SampledGrid, discover
from server.secure import quantization, secure_round
from server.strategies import make_strategy, weights_message
from server.validation import (AdapterSpec, Expect, Verdict, check_evaluate_reply, check_secure_metrics,
                               check_train_reply)

log = logging.getLogger("fedllm.server")
EVAL_METRICS = frozenset({"num-examples", *METRICS})
PERSONAL_EVAL_METRICS = (EVAL_METRICS | {f"{who}-{m}" for who in ("personal", "local") for m in SUMMARY_METRICS}
                         | {"personal-declined"})


def _float32(arrays: ArrayRecord) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v.numpy(), dtype=np.float32)) for k, v in arrays.items()})



def _to_state(arrays: ArrayRecord):
    return arrays.to_torch_state_dict()


def delta_norm_np(delta: dict[str, np.ndarray]) -> float:
    return math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))


def _mean_metrics(per_client: dict[str, dict[str, float]]) -> dict[str, float]:
    """Unweighted mean over clients: each client's held-out set counts once."""
    if not per_client:
        return {}
    return {m: statistics.fmean(c[m] for c in per_client.values()) for m in SUMMARY_METRICS}


class Rounds:
    def __init__(self, grid: Grid, config: Config, run_dir: Path):
        # Clients find their state stores (ledgers) under the run directory: send it to them.
        config = config.with_values({"run-dir": str(run_dir)})
        self.grid, self.config, self.run = grid, config, RunDir(run_dir)
        self.base = resolve_base(config)
        model, _ = load_base(self.base)
        self.model = attach_lora(model, config.lora, config.seed)
        self.arrays = ArrayRecord(adapter_state(self.model))
        self.spec = AdapterSpec.from_state(adapter_state(self.model))
        self.base_bytes = base_model_bytes(self.model)
        self.upload: list[int] = []
        self.rejected = 0
        self.privacy_reports: dict[str, dict[str, Any]] = {}
        self.node_client: dict[int, str] = {}
        self.infos: dict[int, NodeInfo] = {}  # what each node declared at discovery
        self.declined: dict[str, list[int]] = {}
        # Names this run in every ledger entry it causes: a state store outlives runs.
        self.run_id = uuid.uuid4().hex[:12]
        self.user_level: UserLevel | None = None  # fixed once the clients are known
        # Poisson participation is amplification only while the draw is secret: not the public seed.
        self.sampling_seed = int.from_bytes(os.urandom(8), "little")
        self.small_cohort_rounds: list[int] = []
        self.genesis: dict[str, str] = {}  # client -> its ledger's genesis hash: a ledger that starts over is flagged
        self.restarted_ledgers: dict[str, list[str]] = {}
        self.registry = Path(config.privacy.genesis_registry) if config.privacy.genesis_registry else None
        if self.registry is not None and self.registry.exists():
            self.genesis = read_genesis_registry(self.registry)

    def _config_record(self, server_round: int) -> ConfigRecord:
        return ConfigRecord({**self.config.to_flat(), "server-round": server_round, "run-id": self.run_id})

    def train_round(self, server_round: int, strategy, nodes: list[int]) -> dict[str, Any]:
        """Sample -> train -> validate -> aggregate one round; its metrics.jsonl record."""
        if self.config.secagg.enabled:
            record, mean, contributors = self.secure_collect(server_round, nodes)
            # every weight is 1 under user-level DP: mean * contributors is the sum
            total = {k: v * contributors for k, v in mean.items()} if mean is not None and self.user_level else None
        else:
            record, accepted = self.plain_collect(server_round, strategy, nodes)
            mean, total, contributors = None, None, len(accepted)
            if self.user_level is not None:
                total = self._sum([delta for _, delta, _ in accepted])
            elif accepted:
                replies = [weights_message(self.arrays, delta, weight) for _, delta, weight in accepted]
                self._aggregate(strategy, server_round, replies)
        if self.user_level is not None:
            if total is None:  # nobody contributed: the round still releases the noise
                total = self._sum([])
            self._apply(strategy, server_round, self.user_level.noisy_mean(
                {k: torch.from_numpy(v) for k, v in total.items()}))
            record["user_dp"] = {"contributors": contributors, "denominator": self.user_level.denominator,
                                 "noise_std": self.user_level.noise_std}
        elif mean is not None and contributors:  # secure aggregation without user-level DP
            self._apply(strategy, server_round, {k: torch.from_numpy(v) for k, v in mean.items()})
        if not contributors:
            log.warning("round %d: no acceptable replies; global adapter unchanged%s", server_round,
                        " but for the noise" if self.user_level else "")
        return record

    def _sum(self, deltas: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        total = {k: np.zeros(self.spec.shapes[k], np.float64) for k in self.spec.shapes}
        for delta in deltas:
            for k in total:
                total[k] += delta[k]
        return total

    def _apply(self, strategy, server_round: int, update: dict[str, torch.Tensor]) -> None:
        """Hand `global + update` to the configured strategy as one reply: FedAvg takes it
        as the new global adapter, FedAdam as its pseudo-gradient, as Flower defines them."""
        weights = ArrayRecord({k: Array(self.arrays[k].numpy() + update[k].numpy().astype(np.float32))
                               for k in self.arrays.keys()})
        reply = Message(RecordDict({"arrays": weights, "metrics": MetricRecord({"num-examples": 1})}),
                        dst_node_id=0, message_type=MessageType.TRAIN)
        self._aggregate(strategy, server_round, [reply])

    def _aggregate(self, strategy, server_round: int, replies: list[Message]) -> None:
        """The strategy's step; a result that is not finite leaves the global adapter (and is logged)."""
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is None:
            return
        candidate = _float32(new_arrays)
        if all(np.isfinite(a.numpy()).all() for a in candidate.values()):
            self.arrays = candidate
        else:
            log.warning("round %d: the strategy's result is not finite; global adapter unchanged", server_round)

    def _expect(self, node: int) -> Expect:
        info = self.infos.get(node)
        return Expect(client_id=info.client_id if info else self.node_client.get(node, ""),
                      num_records=info.num_records if info else None,
                      num_heldout=info.num_heldout if info else None,
                      local_steps=self.config.local_steps, privacy=self.config.privacy.enabled)

    def _book(self, server_round: int, client: str, verdict: Verdict, declined: list) -> None:
        """Book what a checked reply says about its sender: its report (stored under the
        node's discovered id only) and its decline."""
        if verdict.report is not None and client != "?":
            self.record_privacy(client, verdict.report)
        if verdict.declined:
            log.info("round %d: client %s %s", server_round, say(client), say(verdict.declined, 300))
            declined.append({"client_id": client, "reason": verdict.declined[:MAX_TEXT]})
            self.declined.setdefault(client, []).append(server_round)

    def _screen(self, replies, nodes: list[int], check) -> list[tuple[int, str, Verdict]]:
        """(node, client, verdict) per reply: one reply per asked node; any other is rejected."""
        asked, seen, out = set(nodes), set(), []
        for msg in replies:
            try:
                node = int(msg.metadata.src_node_id)
            except Exception:  # noqa: BLE001
                node = -1
            client = self.node_client.get(node, "?")
            if node not in asked:
                verdict = Verdict(reason="reply from a node that was not asked this round")
            elif node in seen:
                verdict = Verdict(reason="a second reply from the same node in one round")
            else:
                seen.add(node)
                verdict = check(msg, node)
            out.append((node, client, verdict))
        return out

    def _norm_bound(self, norms: list[float]) -> float:
        """validation.max-delta-norm for this round: a number, `auto` (a multiple of the
        round's lower median norm), or infinity when `none`."""
        setting = self.config.validation.max_delta_norm
        if setting == "none":
            return math.inf
        if setting == "auto":
            return self.config.validation.auto_factor * statistics.median_low(norms) if norms else math.inf
        return float(setting)

    def plain_collect(self, server_round: int, strategy, nodes: list[int]) -> tuple[dict[str, Any], list]:
        """Plain round: (its record, [(client, delta, weight)] of the accepted replies)."""
        grid = SampledGrid(self.grid, nodes)
        messages = (strategy.configure_train(server_round, self.arrays, self._config_record(server_round), grid)
                    if nodes else [])  # a Poisson draw can be empty; the strategy would wait for nodes
        replies = list(self.grid.send_and_receive(messages, timeout=self.config.round_timeout)) if messages else []
        screened = self._screen(replies, nodes, lambda msg, node: check_train_reply(msg, self.spec,
                                                                                    self._expect(node)))
        candidates, dropped, declined = [], [], []
        for node, client, verdict in screened:
            if not verdict.reason:
                self._book(server_round, client, verdict, declined)
            if verdict.accepted:
                candidates.append((node, client, verdict, delta_norm_np(verdict.delta)))
            elif verdict.reason:
                dropped.append((node, client, verdict.reason))
        bound = self._norm_bound([n for *_, n in candidates])
        if self.user_level is not None:
            bound = min(bound, self.user_level.clip * (1 + 1e-4))
        accepted = []
        for node, client, verdict, norm in candidates:
            if norm > bound:
                dropped.append((node, client, f"delta L2 norm {norm:.4g} exceeds the bound {bound:.4g} "
                                              f"(validation.max-delta-norm={self.config.validation.max_delta_norm}"
                                              + (f", user-dp.clip={self.user_level.clip:g}" if self.user_level else "")
                                              + ")"))
            else:
                accepted.append((node, client, verdict))
        accepted.sort(key=lambda item: item[1])  # by client id: the sum's order (and its rounding) is reproducible
        for node, client, reason in dropped:
            log.warning("round %d: dropped reply from client %s (node %d): %s", server_round, say(client), node, reason)
        self.rejected += len(dropped)
        upload = [sum(a.nbytes for a in v.delta.values()) for _, _, v in accepted]
        self.upload.extend(upload)
        # Under record-level DP every update weighs the same: the record count is not private.
        weights = [1 if self.config.privacy.enabled else self.infos[n].num_records if n in self.infos
                   else int(v.metrics["num-examples"]) for n, _, v in accepted]
        return {
            "sampled": [self.node_client.get(n, "?") for n in nodes],
            "clients": [client for _, client, _ in accepted],
            "train_loss": [v.metrics["train-loss"] for _, _, v in accepted],
            "steps": [int(v.metrics["steps"]) for _, _, v in accepted],
            "upload_bytes": upload,
            "dropped": [{"node": n, "client_id": c, "reason": r} for n, c, r in dropped],
            "declined": declined,
        }, [(client, v.delta, w) for (_, client, v), w in zip(accepted, weights)]

    def secure_collect(self, server_round: int, nodes: list[int]):
        """A SecAgg+ round: (record, mean of the contributed deltas or None, contributors).

        Masked updates cannot be dropped one by one; a reply's plain fields are still
        checked, and the sum is rejected whole if the protocol fails."""
        config = self._config_record(server_round)
        if self.config.strategy.name == "fedprox":
            config["proximal-mu"] = self.config.strategy.proximal_mu
        result = secure_round(self.grid, self.config, server_round, nodes, self.arrays, config)
        answered, losses, steps, declined, flagged = [], [], [], [], []
        for node, metrics in sorted(result.replies.items()):
            client = self.node_client.get(node, "?")
            report, why, reason = check_secure_metrics(metrics, self._expect(node))
            if not reason:
                self._book(server_round, client, Verdict(declined=why, report=report), declined)
            if reason:  # already inside the sum: say so, it cannot be taken out
                log.warning("round %d: client %s (node %d) sent a bad secure reply: %s", server_round, say(client),
                            node, reason)
                flagged.append({"node": node, "client_id": client, "reason": reason})
            if not why and not reason:
                answered.append(client)
                losses.append(float(metrics["train-loss"]))
                steps.append(int(metrics["steps"]))
        upload = [result.upload_bytes.get(n, 0) for n in nodes if n in result.replies]
        self.upload.extend(upload)
        contributors = len(result.replies) if result.mean is not None else 0
        done = result.mean is not None
        secagg: dict[str, Any] = {"shares": result.shares, "threshold": result.threshold,
                                  "sampled": result.sampled, "contributed": len(result.replies),
                                  "dropped_out": result.sampled - len(result.replies),
                                  "quantization": quantization(self.config, contributors, self.spec.num_values)}
        if result.error:
            secagg["error"] = result.error
            log.warning("round %d: %s", server_round, result.error)
            if result.sampled < 3 or result.threshold >= result.shares:
                self.small_cohort_rounds.append(server_round)
        return {
            "sampled": [self.node_client.get(n, "?") for n in nodes],
            "clients": answered if done else [],
            "train_loss": losses if done else [],
            "steps": steps if done else [],
            "upload_bytes": upload,
            "dropped": flagged,
            "declined": declined,
            "secagg": secagg,
        }, result.mean, contributors

    def evaluate(self, server_round: int, nodes: list[int], personalise: bool = False) -> dict[str, Any]:
        config = self._config_record(server_round)
        config["personalise"] = personalise
        content = RecordDict({"arrays": self.arrays, "config": config})
        messages = [Message(content=content, dst_node_id=n, message_type=MessageType.EVALUATE) for n in nodes]
        per_client: dict[str, dict[str, float]] = {}
        expected = PERSONAL_EVAL_METRICS if personalise else EVAL_METRICS
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout)
        for node, client, verdict in self._screen(replies, nodes, lambda msg, node: check_evaluate_reply(
                msg, expected, self._expect(node))):
            if verdict.reason or client == "?":
                log.warning("round %d: evaluation reply from node %d dropped: %s", server_round, node,
                            verdict.reason or "unknown node")
                continue
            if verdict.report is not None:
                self.record_privacy(client, verdict.report)
            per_client[client] = verdict.metrics
        return {"clients": dict(sorted(per_client.items())), "mean": _mean_metrics(per_client)}

    def personalisation(self, base_eval: dict, last_eval: dict, common: list[str]) -> dict[str, Any]:
        """personalisation.csv (per client) and the summary fields, when it ran."""
        rows = [c for c in common if "personal-perplexity" in last_eval["clients"][c]]
        if not rows:
            return {"personalisation": {"method": self.config.personal.method, "clients": 0}}

        def pick(client: str, prefix: str) -> dict[str, float]:
            m = last_eval["clients"][client]
            return {k: m[f"{prefix}-{k}"] for k in SUMMARY_METRICS}

        lines = ["client_id,base_perplexity,local_only_perplexity,global_perplexity,personalised_perplexity,declined"]
        for c in rows:
            m = last_eval["clients"][c]
            lines.append(f"{c},{base_eval['clients'][c]['perplexity']:.4f},{m['local-perplexity']:.4f},"
                         f"{m['perplexity']:.4f},{m['personal-perplexity']:.4f},{int(m['personal-declined'])}")
        (self.run.path / "personalisation.csv").write_text("\n".join(lines) + "\n")
        beats = [last_eval["clients"][c]["personal-perplexity"] < last_eval["clients"][c]["perplexity"] for c in rows]
        return {
            "personalised": _mean_metrics({c: pick(c, "personal") for c in rows}),
            "local_only": _mean_metrics({c: pick(c, "local") for c in rows}),
            "personalisation": {
                "method": self.config.personal.method, "clients": len(rows),
                "beats_global_fraction": sum(beats) / len(beats),
                "declined": sum(int(last_eval["clients"][c]["personal-declined"]) for c in rows),
            },
        }

    def record_privacy(self, client_id: str, report: dict[str, Any]) -> None:
        """Keep the client's latest epsilon report (it carries its whole history); a ledger
        whose genesis differs from the one this server saw before started over: flag it."""
        known = self.genesis.setdefault(client_id, report["genesis"])
        if known != report["genesis"]:
            log.warning("client %s: its ledger started over (genesis %s..., first seen %s...); its spending before "
                        "is no longer in its reports", say(client_id), report["genesis"][:12], known[:12])
            self.restarted_ledgers.setdefault(client_id, []).append(report["genesis"])
            self.genesis[client_id] = report["genesis"]
        self.privacy_reports[client_id] = report
        atomic.write_json(self.run.path / "privacy" / "clients" / f"{safe_name(client_id)}.json", report)

    def privacy_summary(self) -> dict[str, Any]:
        summary = {"enabled": self.config.privacy.enabled, "run_id": self.run_id,
                   **summarize(self.privacy_reports, self.declined), "restarted_ledgers": self.restarted_ledgers}
        atomic.write_json(self.run.path / "privacy" / "summary.json", summary)
        return summary

    def user_level_report(self, rounds: int) -> dict[str, Any]:
        """privacy/user_level.json after `rounds` completed rounds ({"enabled": false} when off)."""
        if self.user_level is None:
            return {"enabled": False}
        secagg = None
        if self.config.secagg.enabled:
            from server.secure import clipping_range

            s = self.config.secagg
            secagg = {"protocol": "SecAgg+ (Flower SecAggPlusWorkflow / secaggplus_mod)", "num_shares": s.num_shares,
                      "threshold": s.threshold, "quantization_bits": s.quantization_bits,
                      "clipping_range": clipping_range(self.config),
                      "quantization": "stochastic rounding; per round, metrics.jsonl train.secagg.quantization holds "
                                      "the error bound of that round's sum",
                      "small_cohort_rounds": self.small_cohort_rounds,
                      "small_cohort_probability_per_round": self._small_cohort_probability(),
                      "small_cohort_note": "rounds whose sample was too small for secure aggregation released the "
                                           "noise alone; the accounting above does not charge for that choice"}
        report = {"enabled": True, "run_id": self.run_id,
                  **self.user_level.report(rounds, self.config.num_server_rounds, secagg)}
        atomic.write_json(self.run.path / "privacy" / "user_level.json", report)
        return report

    def _small_cohort_probability(self) -> float:
        """P(a round's Poisson sample has fewer than 3 clients): how often the noise-alone rule can apply."""
        from scipy.stats import binom

        u = self.user_level
        return float(binom.cdf(2, u.population, u.sample_rate)) if u.sampling == "poisson" else 0.0

    def checkpoint(self, server_round: int) -> Path:
        path = self.run.checkpoint(server_round)
        save_adapter(self.model, _to_state(self.arrays), path)
        return path

    # -- resume --------------------------------------------------------------------------
    def save_server_state(self, server_round: int, strategy) -> None:
        """After a completed round (its metrics line written): what a restarted server
        needs to go on from the next one, as data (no pickle). `latest.json` is written last."""
        path = self.run.checkpoint(server_round)
        save_state(path / "global.safetensors", _to_state(self.arrays))
        save_strategy(strategy, path)
        atomic.write_json(path / "server-state.json", {
            "round": server_round, "run_id": self.run_id, "declined": self.declined, "rejected": self.rejected,
            "upload": self.upload, "sampling_seed": self.sampling_seed,
            "small_cohort_rounds": self.small_cohort_rounds, "genesis": self.genesis})
        atomic.write_json(self.run.path / "checkpoints" / "latest.json", {"round": server_round})
        if self.registry is not None:
            atomic.write_json(self.registry, self.genesis)

    def resume(self, strategy):
        """(last completed round, strategy) from the run directory; (0, strategy) when new.
        Every file is checked; a bad one stops the server with one line that names it."""
        latest = self.run.path / "checkpoints" / "latest.json"
        if not latest.exists():
            return 0, strategy
        config_changes(read_json(self.run.path / "config.json"), self.config, self.config.resume.accept_changes)
        marker = read_json(latest)
        done = marker.get("round") if isinstance(marker, dict) else None
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= self.config.num_server_rounds:
            raise FedllmError(f"cannot resume: {latest} names no completed round of this run; restore it or delete it")
        path = self.run.checkpoint(done)
        state = check_server_state(read_json(path / "server-state.json"), path / "server-state.json")
        try:
            arrays = load_state(path / "global.safetensors")
        except Exception as exc:  # noqa: BLE001 - a corrupt or planted file
            raise FedllmError(f"cannot resume: {path / 'global.safetensors'} is unreadable ({type(exc).__name__}); "
                              "restore it from a backup or start a new run directory") from None
        if AdapterSpec.from_state(arrays) != self.spec or not all(torch.isfinite(v).all() for v in arrays.values()):
            raise FedllmError(f"cannot resume: {path / 'global.safetensors'} does not fit this run's adapter "
                              "(keys, shapes or non-finite values)")
        strategy = load_strategy(strategy, path, self.spec.shapes)
        self.arrays = ArrayRecord(arrays)
        self.run_id, self.declined = state["run_id"], state["declined"]
        self.rejected, self.upload = state["rejected"], state["upload"]
        self.sampling_seed = state.get("sampling_seed", self.sampling_seed)
        self.small_cohort_rounds = state.get("small_cohort_rounds", [])
        self.genesis = {**self.genesis, **dict(state.get("genesis", {}))}
        for report in sorted((self.run.path / "privacy" / "clients").glob("*.json")):
            data = read_json(report)
            if not isinstance(data, dict) or not isinstance(data.get("client_id"), str):
                raise FedllmError(f"cannot resume: {report} is not a client's epsilon report; restore or remove it")
            self.privacy_reports[data["client_id"]] = data
        self.run.keep_metrics_through(done)  # a round cut short by the crash is run again
        log.warning("resuming run %s after round %d of %d", self.run_id, done, self.config.num_server_rounds)
        return done, strategy

    def run_all(self) -> dict[str, Any]:
        config, started = self.config, time.time()
        done, strategy = self.resume(make_strategy(config))  # first: a run that cannot resume waits for nobody
        self.run.write_config(config)
        clients = discover(self.grid, self._config_record(0), config.num_clients, config.round_timeout, self.infos)
        if not clients:
            raise FedllmError("no node said which client it holds within round-timeout (see the warnings above)")
        if len(clients) < config.clients_per_round:  # devices down: go on with those that are up
            log.warning("only %d of %d devices answered; rounds will sample %d instead of clients-per-round=%d",
                        len(clients), config.num_clients, len(clients), config.clients_per_round)
        self.node_client = {node: client for client, node in clients.items()}
        if config.user_dp.enabled:
            self.user_level = UserLevel.for_run(config, len(clients))
        poisson = self.user_level is not None and self.user_level.sampling == "poisson"
        sampler = ClientSampler(clients, self.sampling_seed if poisson else config.seed)

        def draw() -> list[int]:
            return sampler.poisson(self.user_level.sample_rate) if poisson else sampler.sample(config.clients_per_round)

        eval_nodes = sampler.fixed_subset(config.evaluate.num_clients, config.seed + 1)
        if done:
            for _ in range(done):  # the same clients in the remaining rounds as without the restart
                draw()
            evaluated = [m for m in self.run.metrics() if m.get("evaluate")]
            base_eval, last_eval = evaluated[0]["evaluate"], evaluated[-1]["evaluate"]
        else:
            base_eval = self.evaluate(0, eval_nodes)
            self.checkpoint(0)  # the initial adapter: where every client's first round starts
            self.run.append_metrics({"round": 0, "run_id": self.run_id, "evaluate": base_eval,
                                     "seconds": round(time.time() - started, 2)})
            self.save_server_state(0, strategy)
            last_eval = base_eval
        bar = tqdm(range(done + 1, config.num_server_rounds + 1), desc="rounds", unit="round")
        for server_round in bar:
            t0 = time.time()
            record: dict[str, Any] = {"round": server_round, "train": self.train_round(server_round, strategy, draw())}
            record["checkpoint"] = str(self.checkpoint(server_round).relative_to(self.run.path))
            last = server_round == config.num_server_rounds
            if server_round % config.evaluate.every == 0 or last:
                personalise = last and config.personal.method != "none"
                last_eval = record["evaluate"] = self.evaluate(server_round, eval_nodes, personalise)
                bar.set_postfix(ppl=f"{last_eval['mean'].get('perplexity', float('nan')):.2f}")
            record["seconds"] = round(time.time() - t0, 2)
            self.run.append_metrics(record)
            self.save_server_state(server_round, strategy)
            losses = record["train"]["train_loss"]
            tqdm.write(
                f"round {server_round}/{config.num_server_rounds}: {len(losses)} clients, "
                f"train loss {statistics.fmean(losses) if losses else float('nan'):.3f}, "
                f"held-out ppl {last_eval['mean'].get('perplexity', float('nan')):.2f}, "
                f"{len(record['train']['dropped'])} dropped, {len(record['train']['declined'])} declined, "
                f"{record['seconds']:.1f}s"
            )
            if config.privacy.enabled:
                self.privacy_summary()
            self.user_level_report(server_round)
        bar.close()
        summary = self.summary(base_eval, last_eval, time.time() - started)
        self.run.write_summary(summary)
        return summary

    def summary(self, base_eval: dict, last_eval: dict, seconds: float) -> dict[str, Any]:
        upload = statistics.fmean(self.upload) if self.upload else 0.0
        common = sorted(set(base_eval["clients"]) & set(last_eval["clients"]))
        personal = self.personalisation(base_eval, last_eval, common)
        return {
            **personal,
            "run_id": self.run_id,
            "rounds": self.config.num_server_rounds,
            "num_clients": self.config.num_clients,
            "clients_per_round": self.config.clients_per_round,
            "strategy": self.config.strategy.name,
            "base_model": self.base,
            "evaluated_clients": common,
            "base": _mean_metrics({c: base_eval["clients"][c] for c in common}),
            "global": _mean_metrics({c: last_eval["clients"][c] for c in common}),
            "upload_bytes_per_client_round": upload,
            "base_model_bytes": self.base_bytes,
            "upload_fraction_of_base": upload / self.base_bytes,
            "rejected_replies": self.rejected,
            "privacy": self.privacy_summary() if self.config.privacy.enabled else {"enabled": False},
            "user_level_privacy": self.user_level_report(self.config.num_server_rounds),
            "secure_aggregation": self.config.secagg.enabled,
            "final_checkpoint": str(self.run.checkpoint(self.config.num_server_rounds).relative_to(self.run.path)),
            "wall_seconds": round(seconds, 1),
        }


def run_server(grid: Grid, config: Config, run_dir: Path) -> dict[str, Any]:
    RunDir(run_dir).error_file.unlink(missing_ok=True)
    try:
        summary = Rounds(grid, config, run_dir).run_all()
    except FedllmError as exc:
        atomic.write_bytes(RunDir(run_dir).error_file, f"{exc}\n".encode())
        log.error("%s", exc)
        raise
    finish(run_dir, format_summary(summary))  # summary.txt and plots, as in every run directory
    return summary
