"""The server's run, phase by phase: resume or start, discover the devices, then per round
sample -> collect -> aggregate -> checkpoint -> evaluate, and at the end the summary.

Flower's `Strategy.start` runs all rounds in one call; fedllm acts between the steps of a
round (drop bad replies, write the run directory), so it drives them itself. A round's
aggregation is `fedllm.aggregate`'s steps over deltas, chosen by the config:

    plain:   contributions --weighted mean | robust rule-->  update
    secure:  secure sum --/ contributors-->                  update
    user DP: sum (plain or secure) --noise, / denominator--> update
    then:    server optimizer (FedAvg, FedAdam, ...): global + f(update)
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedllm import aggregate, hive
from fedllm import messages as wire
from fedllm.config import Config
from fedllm.errors import FedllmError
from fedllm.data import synthetic
from fedllm.model import adapter_state, attach_lora, base_model_bytes, load_base, resolve_base
from fedllm.plots import Progress
from fedllm.privacy.user_level import UserLevel
from fedllm.rundir import RunDir
from fedllm.shapes import shape_of
from server.books import Books
from server.checkpoint import resume, save_checkpoint, save_server_state
from server.collect import Cohort, Collected, as_arrays, collect_plain, collect_secure
from server.evaluation import evaluate, mean_metrics, personalisation
from server.reports import hive_summary, user_level_report
from server.sampling import ClientSampler, NodeInfo, discover
from server.validation import AdapterSpec

log = logging.getLogger("fedllm.server")


class Server:
    def __init__(self, grid: Grid, config: Config, run_dir: Path):
        # Clients find their state stores (ledgers) under the run directory: send it to them.
        config = config.with_values({"run-dir": str(run_dir)})
        self.grid, self.config, self.run = grid, config, RunDir(run_dir)
        self.base = resolve_base(config)
        model, _ = load_base(self.base)
        self.model = attach_lora(model, config.lora, config.seed)
        self.k = config.hive.k  # specialists (fedllm.hive): above 1, self.arrays holds them all, packed
        self.arrays = ArrayRecord(hive.pack([adapter_state(self.model)] * self.k))
        self.spec = AdapterSpec.from_state(adapter_state(self.model))  # of one adapter: what a plain delta is
        self.packed_spec = AdapterSpec.from_state(self.arrays.to_torch_state_dict())
        self.base_bytes = base_model_bytes(self.model)
        registry = Path(config.privacy.genesis_registry) if config.privacy.genesis_registry else None
        self.books = Books(self.run, registry)
        self.cohort = Cohort(grid, config, self.spec, {}, {}, self.books)
        self.optimizer = aggregate.make_optimizer(config.strategy)
        # Names this run in every ledger entry it causes: a state store outlives runs.
        self.run_id = uuid.uuid4().hex[:12]
        self.user_level: UserLevel | None = None  # fixed once the clients are known
        # Poisson participation is amplification only while the draw is secret: not the public seed.
        self.sampling_seed = int.from_bytes(os.urandom(8), "little")
        self.noise = np.random.default_rng()  # user-level noise: from the OS, never the public seed

    @property
    def infos(self) -> dict[int, NodeInfo]:
        return self.cohort.infos

    def request(self, server_round: int) -> ConfigRecord:
        """The config record of every request: the flat config, the round and the run id."""
        return ConfigRecord({**self.config.to_flat(), wire.SERVER_ROUND: server_round, wire.RUN_ID: self.run_id})

    # -- one round -----------------------------------------------------------------------
    def train_round(self, server_round: int, nodes: list[int]) -> dict[str, Any]:
        """Sample -> train -> validate -> aggregate one round; its metrics.jsonl record."""
        collect = collect_secure if self.config.secagg.enabled else collect_plain
        request = self.request(server_round)
        if self.config.strategy.name == "fedprox":  # FedProx's one client-side term
            request[wire.PROXIMAL_MU] = self.config.strategy.proximal_mu
        collected = collect(self.cohort, server_round, nodes, self.arrays, request) if nodes \
            else Collected({"sampled": [], "clients": [], "train_loss": [], "steps": [], "upload_bytes": [],
                            "dropped": [], "declined": []})  # a Poisson draw can be empty
        if self.k > 1:  # whether a device's choice read its records (the audit requires its charge then)
            collected.record.setdefault("hive", {})["identical"] = self.specialists_identical()
        update = self.update(collected)
        if self.user_level is not None:
            collected.record["user_dp"] = {"contributors": collected.contributors,
                                           "denominator": self.user_level.denominator,
                                           "noise_std": self.user_level.noise_std}
        if update is not None:
            self.apply(server_round, update)
        if not collected.contributors:
            log.warning("round %d: no acceptable replies; global adapter unchanged%s", server_round,
                        " but for the noise" if self.user_level else "")
        return collected.record

    def update(self, collected: Collected) -> aggregate.Delta | list[aggregate.Delta | None] | None:
        """The round's update (None: the global adapter stays): the composition of steps; a
        hive's is one per specialist, each from its own choosers (None: nobody chose it)."""
        u = self.user_level
        plan = aggregate.plan_for(self.config, u.noise_std if u else None, u.denominator if u else 1.0)
        if self.k == 1:
            return aggregate.round_update(plan, self.spec.shapes, collected.contributions, collected.secure_sum,
                                          collected.contributors, self.noise, collected.running)
        sums = hive.unpack(collected.secure_sum, self.k) if collected.secure_sum is not None else [None] * self.k
        # a secure count is a sum of masked one-hots: below one half, nobody (honest) chose it
        counts = [c if c >= 0.5 else 0.0 for c in (collected.counts or [0.0] * self.k)]
        chosen = [[c for c in collected.contributions if c.specialist == j] for j in range(self.k)]
        # below hive.min-choosers a specialist stays: one device alone would be its whole update
        least = self.config.hive.min_choosers
        enough = [round(counts[j]) >= least for j in range(self.k)]
        held = [j for j in range(self.k) if not enough[j] and counts[j]]
        if held:
            collected.record.setdefault("hive", {})["held"] = held
            log.info("specialists %s had fewer than hive.min-choosers=%d choosers; they stay", held, least)
        updates = [aggregate.round_update(
            plan, self.spec.shapes, chosen[j], sums[j], counts[j], self.noise,
            collected.running_by[j] if collected.running_by else None) if enough[j] else None for j in range(self.k)]
        return updates if any(u is not None for u in updates) else None

    def apply(self, server_round: int, update: aggregate.Delta | list[aggregate.Delta | None]) -> None:
        """The server optimizer's step; a result that is not finite leaves the global adapter.
        A hive's specialists share one optimizer over the packed adapter (its state is per
        coordinate); one nobody chose keeps its values and state."""
        current = {k: v.numpy() for k, v in self.arrays.items()}
        saved = {k: dict(v) for k, v in self.optimizer.state.items()}
        updates = update if isinstance(update, list) else None
        if updates is not None:
            update = hive.combine(updates, self.spec.shapes)
        candidate = self.optimizer.step(server_round, current, update)
        if updates is not None:
            candidate = hive.keep_unchosen(candidate, current, self.optimizer.state, saved, updates)
        if aggregate.finite(candidate):
            self.arrays = as_arrays(candidate)
        else:
            self.optimizer.state = saved
            log.warning("round %d: the aggregate is not finite; global adapter unchanged", server_round)

    def evaluate(self, server_round: int, nodes: list[int], personalise: bool = False) -> dict[str, Any]:
        result = evaluate(self.cohort, server_round, nodes, self.arrays, self.request(server_round), personalise)
        if self.k > 1:  # whether a device's choice read its records (the audit requires a charge then)
            result["hive"] = {"identical": self.specialists_identical(),
                              "final": server_round >= self.config.num_server_rounds}
        return result

    def specialists_identical(self) -> bool:
        """Whether the hive's specialists, as the global adapter holds them now, are all the
        same (a new hive): a device's choice among them then reads no record."""
        return hive.identical(hive.unpack({k: v.numpy() for k, v in self.arrays.items()}, self.k))

    # -- the run -------------------------------------------------------------------------
    def run_all(self) -> dict[str, Any]:
        config, started = self.config, time.time()

        # 1. Resume first: a run that cannot resume waits for nobody.
        done = resume(self)
        self.run.write_config(config)

        # 2. Discover the devices: which node holds which client.
        clients = discover(self.grid, self.request(0), config.num_clients, config.round_timeout, self.infos)
        if not clients:
            raise FedllmError("no node said which client it holds within round-timeout (see the warnings above)")
        if len(clients) < config.clients_per_round:  # devices down: go on with those that are up
            log.warning("only %d of %d devices answered; rounds will sample %d instead of clients-per-round=%d",
                        len(clients), config.num_clients, len(clients), config.clients_per_round)
        self.cohort.node_client = {node: client for client, node in clients.items()}
        if config.user_dp.enabled:
            self.user_level = UserLevel.for_run(config, len(clients))
        poisson = self.user_level is not None and self.user_level.sampling == "poisson"
        sampler = ClientSampler(clients, self.sampling_seed if poisson else config.seed)

        def draw() -> list[int]:
            return sampler.poisson(self.user_level.sample_rate) if poisson else sampler.sample(config.clients_per_round)

        # 3. Round 0: the base, evaluated before training (or what a resumed run recorded).
        eval_nodes = sampler.fixed_subset(config.evaluate.num_clients, config.seed + 1)
        if done:
            for _ in range(done):  # the same clients in the remaining rounds as without the restart
                draw()
            evaluated = [m for m in self.run.metrics() if m.get("evaluate")]
            base_eval, last_eval = evaluated[0]["evaluate"], evaluated[-1]["evaluate"]
        else:
            base_eval = last_eval = self.evaluate(0, eval_nodes)
            save_checkpoint(self, 0)  # the initial adapter: where every client's first round starts
            # what each device declared at discovery: the auditor compares it with its ledger's record count
            discovery = {info.client_id: info.num_records for info in self.cohort.infos.values()}
            self.run.append_metrics({"round": 0, "run_id": self.run_id, "evaluate": base_eval, "discovery": discovery,
                                     "seconds": round(time.time() - started, 2)})
            save_server_state(self, 0)

        # 4. The rounds: train, checkpoint, evaluate, record.
        progress = Progress(config.num_server_rounds, last_eval["mean"].get("perplexity", float("nan")))
        for server_round in range(done + 1, config.num_server_rounds + 1):
            t0 = time.time()
            record: dict[str, Any] = {"round": server_round, "train": self.train_round(server_round, draw())}
            record["checkpoint"] = str(save_checkpoint(self, server_round).relative_to(self.run.path))
            last = server_round == config.num_server_rounds
            if server_round % config.evaluate.every == 0 or last:
                personalise = last and config.personal.method != "none"
                last_eval = record["evaluate"] = self.evaluate(server_round, eval_nodes, personalise)
            record["seconds"] = round(time.time() - t0, 2)
            self.run.append_metrics(record)
            save_server_state(self, server_round)
            print(progress.line(record), flush=True)  # `fedllm server`'s operator sees it through `flwr run --stream`
            if config.privacy.enabled:
                self.books.privacy_summary(True, self.run_id)
            user_level_report(self, server_round)

        # 5. The summary.
        summary = self.summary(base_eval, last_eval, time.time() - started)
        self.run.write_summary(summary)
        return summary

    def summary(self, base_eval: dict, last_eval: dict, seconds: float) -> dict[str, Any]:
        config, books = self.config, self.books
        upload = statistics.fmean(books.upload) if books.upload else 0.0
        common = sorted(set(base_eval["clients"]) & set(last_eval["clients"]))
        return {
            **personalisation(self.run, config.personal.method, base_eval, last_eval, common),
            "run_id": self.run_id,
            "rounds": config.num_server_rounds,
            "num_clients": config.num_clients,
            "data": {"partitioner": config.data.partitioner, "synthetic_clients": synthetic(config)},
            "clients_per_round": config.clients_per_round,
            "strategy": config.strategy.name,
            "base_model": self.base,
            **({"base_shape": shape} if (shape := shape_of(self.base)) else {}),
            "device": config.device,
            "model_dtype": config.model.dtype,
            "evaluated_clients": common,
            "base": mean_metrics({c: base_eval["clients"][c] for c in common}),
            "global": mean_metrics({c: last_eval["clients"][c] for c in common}),
            "upload_bytes_per_client_round": upload,
            "base_model_bytes": self.base_bytes,
            "upload_fraction_of_base": upload / self.base_bytes,
            "rejected_replies": books.rejected,
            "privacy": books.privacy_summary(True, self.run_id) if config.privacy.enabled else {"enabled": False},
            "user_level_privacy": user_level_report(self, config.num_server_rounds),
            "secure_aggregation": config.secagg.enabled,
            **({"hive": hive_summary(self, last_eval)} if self.k > 1 else {}),
            "final_checkpoint": str(self.run.checkpoint(config.num_server_rounds).relative_to(self.run.path)),
            "wall_seconds": round(seconds, 1),
        }
