"""One typed run configuration, built from flat dotted keys and validated up front.

The same keys work in TOML files (`[lora] r = 8` or `"lora.r" = 8`), in `--set lora.r=8`
overrides and in Flower's `--run-config`. Keys are Flower-style kebab-case; groups are
dotted. Every value is checked before anything runs, and an error names the key and
what is allowed.
"""

from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from fedllm.errors import ConfigError

Check = Callable[[Any], bool]


def _key(default: Any, check: Check | None = None, allowed: str = "", doc: str = "") -> Any:
    return field(default=default, metadata={"check": check, "allowed": allowed, "doc": doc})


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _fraction(v: Any) -> bool:
    return 0 < v < 1


def _one_of(*choices: str) -> tuple[Check, str]:
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


def _in(lo: float, hi: float, what: str = "an integer") -> tuple[Check, str]:
    """A bounded size: absurd values are refused before anything starts (or allocates)."""
    return (lambda v: lo <= v <= hi), f"{what} in {lo}..{hi}"


POS_INT = (_positive, "an integer >= 1")
NON_NEG_INT = (_non_negative, "an integer >= 0")
POS_FLOAT = (_positive, "a number > 0")
NON_NEG_FLOAT = (_non_negative, "a number >= 0")
FRACTION = (_fraction, "a number strictly between 0 and 1")


def _gpu_share(v: str) -> bool:
    if v == "auto":
        return True
    try:
        return 0 <= float(v) <= 1
    except ValueError:
        return False


def _device(v: str) -> bool:
    import re

    return bool(re.fullmatch(r"auto|cpu|cuda|cuda:\d+|mps", v))


@dataclass(frozen=True)
class DataConfig:
    path: str = _key("", None, "a folder path", "folder of per-client .txt/.jsonl files; empty: the embedded plays")
    corpus: str = _key("plays", *_one_of("plays", "code", "mixed"),
                       doc="the embedded clients (data.path empty): plays (speaking roles), code (modules of "
                           "the pinned sympy source) or mixed (half of each)")
    min_records: int = _key(20, *_in(1, 10**6), doc="a role/file needs this many records to become a client")
    holdout_fraction: float = _key(0.2, *FRACTION, doc="share of each client's last records held out")
    public_fraction: float = _key(0.5, *FRACTION, doc="share of plays kept public for the base model")
    split_seed: int = _key(0, *_in(0, 2**32 - 1), doc="seed of the public/private split of plays (and of data partitions)")
    partitioner: str = _key("natural", *_one_of("natural", "iid", "dirichlet"),
                            doc="natural: one client per role / file / data.id-column value; iid or dirichlet: "
                                "data.num-partitions synthetic clients (Flower Datasets)")
    text_column: str = _key("text", lambda v: bool(v.strip()), "a column name",
                            doc="the record text column of a .jsonl/.csv/.parquet data.path")
    id_column: str = _key("client_id", lambda v: bool(v.strip()), "a column name",
                          doc="the client id column (data.partitioner=natural on a dataset file)")
    label_column: str = _key("label", lambda v: bool(v.strip()), "a column name",
                             doc="the label column data.partitioner=dirichlet splits over (the role, on the plays)")
    num_partitions: int = _key(0, *_in(0, 10**6), doc="iid/dirichlet: number of partitions; 0: num-clients")
    alpha: float = _key(0.5, *POS_FLOAT, doc="dirichlet concentration: small is more skewed")


@dataclass(frozen=True)
class ModelConfig:
    name: str = _key("builtin", lambda v: bool(v.strip()), "'builtin', a Hugging Face hub id or a local path")
    max_length: int = _key(128, *_in(8, 32768), "tokens per record (longer ones are truncated)")
    cache_dir: str = _key("", None, "a folder path", "where the built-in base is cached; empty: ~/.cache/fedllm")
    dtype: str = _key("auto", *_one_of("auto", "float32", "bfloat16", "float16"),
                      doc="the frozen base's precision (LoRA weights, optimizer state and deltas stay float32); "
                          "auto: bfloat16 on a CUDA device that supports it, else float32")


@dataclass(frozen=True)
class BaseConfig:
    vocab_size: int = _key(4096, *_in(300, 1 << 20))
    hidden_size: int = _key(256, *_in(16, 16384))
    layers: int = _key(4, *_in(1, 256))
    heads: int = _key(4, *_in(1, 256))
    seq_len: int = _key(128, *_in(16, 32768))
    steps: int = _key(400, *_in(1, 10**7))
    batch_size: int = _key(16, *_in(1, 4096))
    lr: float = _key(3e-3, *POS_FLOAT)
    seed: int = _key(0, *_in(0, 2**32 - 1))


@dataclass(frozen=True)
class LoraConfig:
    r: int = _key(8, *_in(1, 1024), doc="LoRA rank")
    alpha: float = _key(16.0, *POS_FLOAT)
    dropout: float = _key(0.0, lambda v: 0 <= v < 1, "a number in [0, 1)")
    target_modules: str = _key("auto", lambda v: bool(v.strip()), "'auto' or comma-separated module names")
    freeze_a: bool = _key(False, None, "true or false",
                          "FFA-LoRA: A stays as drawn from `seed` (the same on every device), only B trains and "
                          "is sent: half the upload, and under DP half the noised coordinates")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = _key(8, *_in(1, 10**5))
    lr: float = _key(1e-2, *POS_FLOAT)
    weight_decay: float = _key(0.0, *NON_NEG_FLOAT)
    optimizer: str = _key("adamw", lambda v: v in ("adamw", "sgd"), "one of 'adamw', 'sgd'",
                          "the local optimizer; under DP with few local steps 'sgd' (a fresh Adam moves every "
                          "coordinate by about lr, noise or not)")


ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
STRATEGIES = ("fedavg", "fedadam", "fedprox", "fedavgm", "fedyogi", "fedadagrad", *ROBUST_STRATEGIES)


def _norm_setting(v: str) -> bool:
    if v in ("auto", "none"):
        return True
    try:
        number = float(v)
    except ValueError:
        return False
    return math.isfinite(number) and number > 0


@dataclass(frozen=True)
class StrategyConfig:
    name: str = _key("fedavg", *_one_of(*STRATEGIES), doc="Flower strategy over the clients' deltas; fedmedian, "
                     "fedtrimmedavg, krum, multikrum and bulyan are robust to some poisoned updates")
    proximal_mu: float = _key(0.01, *NON_NEG_FLOAT, doc="FedProx proximal term weight")
    server_lr: float = _key(0.01, *POS_FLOAT, doc="FedAdam server learning rate (eta)")
    beta_1: float = _key(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)")
    beta_2: float = _key(0.99, lambda v: 0 <= v < 1, "a number in [0, 1)")
    tau: float = _key(1e-3, *POS_FLOAT, doc="FedAdam/FedYogi/FedAdagrad adaptivity")
    server_momentum: float = _key(0.9, lambda v: 0 <= v < 1, "a number in [0, 1)", doc="FedAvgM momentum")
    trim_beta: float = _key(0.2, lambda v: 0 < v < 0.5, "a number in (0, 0.5)",
                            doc="FedTrimmedAvg: fraction cut from each end per coordinate")
    num_malicious: int = _key(1, *NON_NEG_INT, doc="Krum/MultiKrum/Bulyan: poisoned updates tolerated per round")
    num_selected: int = _key(0, *NON_NEG_INT, doc="MultiKrum: updates kept (0: clients-per-round minus num-malicious)")


@dataclass(frozen=True)
class ValidationConfig:
    max_delta_norm: str = _key("auto", _norm_setting, "'auto', 'none' or a number > 0",
                               doc="replies whose delta L2 norm exceeds this are dropped (plain rounds); auto: "
                                   "validation.auto-factor times the round's (lower) median norm")
    auto_factor: float = _key(10.0, lambda v: v >= 1, "a number >= 1", doc="multiple of the median for 'auto'")


@dataclass(frozen=True)
class EvaluateConfig:
    num_clients: int = _key(20, *_in(1, 10**6), doc="size of the fixed set of clients evaluated each round (capped at num-clients)")
    batch_size: int = _key(16, *_in(1, 10**5))
    every: int = _key(1, *_in(1, 10**5), doc="evaluate every N rounds (and always after the last)")


@dataclass(frozen=True)
class SimulationConfig:
    num_cpus: int = _key(0, *NON_NEG_INT, doc="CPUs for the simulation engine; 0: all")
    cpus_per_client: int = _key(1, *POS_INT)
    cache_mib: int = _key(256, *_in(1, 1 << 20), doc="tokenised client data a worker keeps, in MiB (least recently used "
                                              "clients are dropped first): memory flat in the population")
    ray_address: str = _key("", None, "empty, 'auto' or host:port",
                            doc="run on an existing Ray cluster (`ray start --head` printed its address); "
                                "empty: start a local one")
    gpus_per_client: str = _key("auto", _gpu_share, "'auto' or a number in [0, 1] (0.25: four clients share a GPU)",
                                doc="GPU share of each simulated client (Ray's num_gpus); auto: none without a GPU, "
                                    "else as many clients per GPU as run at once, at most 8")


@dataclass(frozen=True)
class PersonalConfig:
    method: str = _key("none", *_one_of("none", "finetune", "adapter", "ditto"),
                       doc="how each device personalises the global adapter (evaluated after the last round)")
    steps: int = _key(10, *_in(1, 10**5), doc="personal training steps (and local-only baseline steps)")
    lr: float = _key(1e-3, *POS_FLOAT, doc="chosen on validation splits of training records, never held-out")
    r: int = _key(8, *_in(1, 1024), doc="rank of the personal adapter (method 'adapter')")
    lambda_: float = _key(0.1, *NON_NEG_FLOAT, doc="Ditto: weight of (lambda/2)*||personal - global||^2")
    early_stopping: bool = _key(True, None, "true or false",
                                "without DP: keep the step with the best loss on the last 20% of training records")
    every_round: bool = _key(False, None, "true or false",
                             "update the personal adapter after every training participation (Ditto's protocol), "
                             "not only when evaluated after the last round; each update is charged under DP")


@dataclass(frozen=True)
class PrivacyConfig:
    enabled: bool = _key(True, None, "true or false", "record-level DP-SGD on every client")
    target_epsilon: float = _key(8.0, lambda v: 0 < v <= 100, "a number in (0, 100]",
                                 "per-client epsilon budget over its whole life")
    delta: float = _key(1e-5, *FRACTION, doc="per-client delta; must be below 1/n for n records")
    max_grad_norm: float = _key(1.0, *POS_FLOAT, doc="per-record gradient clipping bound")
    planned_rounds: int = _key(0, *_in(0, 10**5), doc="participations the noise is calibrated for; 0: auto")
    accountant: str = _key("prv", *_one_of("prv", "rdp"))
    state_dir: str = _key("", None, "a folder path", "client state stores (ledgers); empty: <run-dir>/clients")
    genesis_registry: str = _key("", None, "a file path",
                                 "server side: a JSON file of each client's ledger genesis, kept across runs, so a "
                                 "ledger that starts over is flagged; empty: within this run only")


@dataclass(frozen=True)
class SecAggConfig:
    enabled: bool = _key(False, None, "true or false",
                         "Flower SecAgg+: the server learns only the sum of the sampled clients' updates")
    num_shares: int = _key(0, lambda v: v == 0 or v >= 3, "0 or an integer >= 3",
                           "neighbours each client secret-shares its keys with (itself included); 0: all sampled")
    threshold: int = _key(0, lambda v: v == 0 or v >= 2, "0 or an integer >= 2",
                          "shares needed to unmask; a round survives while every client keeps this many live "
                          "neighbours; 0: two thirds of the shares")
    clipping_range: float = _key(0.0, *NON_NEG_FLOAT,
                                 doc="each delta coordinate is clipped to +-this before quantisation; "
                                     "0: user-dp.clip when user-level DP is on (lossless), else 8")
    quantization_bits: int = _key(22, lambda v: 8 <= v <= 28, "an integer in 8..28",
                                  doc="levels per coordinate = 2**bits; the sum is taken modulo 2**32")


@dataclass(frozen=True)
class UserDPConfig:
    enabled: bool = _key(False, None, "true or false",
                         "user-level DP (DP-FedAvg): clip each client's delta, Gaussian noise on the sum")
    clip: float = _key(5.0, *POS_FLOAT, doc="L2 bound on a client's whole adapter delta "
                                            "(default: about the median norm in round 1 of the default experiment)")
    noise_multiplier: float = _key(1.0, *NON_NEG_FLOAT, doc="noise std = this * clip, on the sum of deltas")
    target_epsilon: float = _key(0.0, *NON_NEG_FLOAT,
                                 doc="> 0: choose the noise multiplier that spends this over num-server-rounds")
    delta: float = _key(1e-3, *FRACTION, doc="user-level delta; must be below 1/(number of clients)")
    sampling: str = _key("poisson", *_one_of("poisson", "fixed"),
                         doc="poisson: each client joins a round independently with prob clients-per-round/clients "
                             "(amplification claimed); fixed: exactly clients-per-round (no amplification claimed)")
    noise_cohort_size: int = _key(0, *NON_NEG_INT,
                                  doc="> 0: a simulation of a larger deployment: add the noise a cohort of this many "
                                      "clients would get (pfl-research's noise_cohort_size); its epsilon is that "
                                      "deployment's, not a guarantee of this run. 0: off")


@dataclass(frozen=True)
class HiveConfig:
    k: int = _key(1, lambda v: 1 <= v <= 64, "an integer in 1..64",
                  doc="specialist adapters the devices choose among (fedllm.hive); 1: one global adapter")
    method: str = _key("ifca", *_one_of("ifca"),
                       doc="ifca: each device trains the specialist with the lowest loss on its training records")
    score_records: int = _key(0, *_in(0, 10**6),
                              doc="> 0: a device scores the specialists on about this many of its training "
                                  "records (each kept with probability cap/n by a keyed hash of its own tokens, so "
                                  "one record changes only its own vote); 0: all of them")
    min_choosers: int = _key(2, *_in(1, 10**6),
                             doc="a specialist moves in a round only when at least this many devices trained it: "
                                 "a lone chooser would be its whole update (1: no minimum)")
    select_noise: float = _key(5.0, *_in(0.1, 1e4, "a number"),
                               doc="under DP: std of the Gaussian noise on the per-record votes of a device's "
                                   "choice (report-noisy-max, charged as a Gaussian release of this multiplier)")


@dataclass(frozen=True)
class ResumeConfig:
    accept_changes: bool = _key(False, None, "true or false",
                                "a restarted server accepts config changes that affect neither privacy nor shapes "
                                "(round-timeout, evaluate.every, evaluate.batch-size, simulation.*)")


@dataclass(frozen=True)
class Config:
    num_server_rounds: int = _key(5, *_in(1, 10**5))
    num_clients: int = _key(100, *_in(1, 10**6))
    clients_per_round: int = _key(10, *_in(1, 10**6))
    local_steps: int = _key(5, *_in(1, 10**5), doc="optimizer steps per client per round")
    seed: int = _key(0, *_in(0, 2**32 - 1))
    run_dir: str = _key("", None, "a folder path", "empty: runs/<timestamp>")
    round_timeout: float = _key(600.0, *POS_FLOAT, doc="seconds to wait for replies in a round")
    device: str = _key("auto", _device, "auto, cpu, cuda, cuda:N or mps",
                       doc="where clients train and evaluate; auto: CUDA, then MPS, then CPU (a device's own "
                           "choice: never taken from the server)")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    base: BaseConfig = field(default_factory=BaseConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    personal: PersonalConfig = field(default_factory=PersonalConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    user_dp: UserDPConfig = field(default_factory=UserDPConfig)
    hive: HiveConfig = field(default_factory=HiveConfig)

    @classmethod
    def from_flat(cls, values: Mapping[str, Any]) -> "Config":
        """Build and validate a config from flat dotted keys over the defaults."""
        return with_overrides(cls(), values)

    def to_flat(self) -> dict[str, bool | int | float | str]:
        """Flat dotted keys, the shape Flower's run_config and ConfigRecord take."""
        return dict(_iter_flat(self, ""))

    def with_values(self, values: Mapping[str, Any]) -> "Config":
        return with_overrides(self, values)


def planned_rounds(config: Config) -> int:
    """Participations per client the noise is calibrated for: the configured number, or
    the expected number plus two standard deviations under uniform sampling (so about
    97% of clients never have to decline), at least 1 and at most every round."""
    if config.privacy.planned_rounds:
        return config.privacy.planned_rounds
    rounds, p = config.num_server_rounds, config.clients_per_round / config.num_clients
    likely = rounds * p + 2 * math.sqrt(rounds * p * (1 - p))
    return max(1, min(rounds, math.ceil(likely)))


def planned_selections(config: Config) -> int:
    """Private specialist choices a client's noise is calibrated for (hive.k > 1): one per
    planned training round, one when it is first evaluated without a choice of its own,
    and one after the last round (the specialist it personalises from)."""
    return planned_rounds(config) + 2 if config.hive.k > 1 else 0


def planned_steps(config: Config) -> int:
    """DP-SGD steps a client's noise is calibrated for: its planned training rounds, plus,
    when personalisation is on, one personalisation and one local-only baseline, and with
    `personal.every-round` a personal update in every training round too."""
    personalising = config.personal.method != "none"
    personal = 2 * config.personal.steps if personalising else 0
    per_round = config.local_steps + (config.personal.steps if personalising and config.personal.every_round else 0)
    return planned_rounds(config) * per_round + personal


def _kebab(name: str) -> str:
    """Attribute name to key: `target_modules` -> `target-modules`, `lambda_` -> `lambda`."""
    return name.rstrip("_").replace("_", "-")


def _iter_flat(obj: Any, prefix: str):
    for f in fields(obj):
        value = getattr(obj, f.name)
        key = prefix + _kebab(f.name)
        if _is_group(f):
            yield from _iter_flat(value, key + ".")
        else:
            yield key, value


def _is_group(f) -> bool:
    return "check" not in f.metadata


def _spec() -> dict[str, tuple[str, ...]]:
    """Flat key -> attribute path, e.g. 'lora.target-modules' -> ('lora', 'target_modules')."""
    spec = {}
    for f in fields(Config):
        if _is_group(f):
            for g in fields(f.default_factory()):
                spec[f"{_kebab(f.name)}.{_kebab(g.name)}"] = (f.name, g.name)
        else:
            spec[_kebab(f.name)] = (f.name,)
    return spec


KEYS = _spec()


def _field(path: tuple[str, ...]):
    owner: Any = Config
    for name in path[:-1]:
        owner = next(f for f in fields(owner) if f.name == name).default_factory
    return next(f for f in fields(owner) if f.name == path[-1])


def _coerce(key: str, value: Any, kind: type) -> Any:
    def bad(expected: str) -> ConfigError:
        return ConfigError(f"config key '{key}': got {value!r}, expected {expected}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise bad("true or false")
    if kind is int:
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad("an integer") from None
        raise bad("an integer")
    if kind is float:
        if isinstance(value, bool):
            raise bad("a number")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("a number") from None
        if not math.isfinite(number):
            raise bad("a finite number")
        return number
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise bad("a string")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def with_overrides(config: Config, values: Mapping[str, Any]) -> Config:
    """Apply flat dotted keys to `config`, refusing unknown keys and bad values."""
    groups: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, KEYS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"unknown config key '{key}'{hint} (`fedllm keys` lists them all)")
        path = KEYS[key]
        f = _field(path)
        value = _coerce(key, raw, _TYPES[f.type] if isinstance(f.type, str) else f.type)
        check = f.metadata["check"]
        if check is not None and not check(value):
            raise ConfigError(f"config key '{key}': got {value!r}, expected {f.metadata['allowed']}")
        if len(path) == 2:
            groups.setdefault(path[0], {})[path[1]] = value
        else:
            top[path[0]] = value
    for group, changes in groups.items():
        top[group] = replace(getattr(config, group), **changes)
    result = replace(config, **top)
    _check_together(result)
    return result


def _check_together(c: Config) -> None:
    if c.clients_per_round > c.num_clients:
        raise ConfigError(
            f"clients-per-round={c.clients_per_round} exceeds num-clients={c.num_clients}; "
            "lower clients-per-round or raise num-clients"
        )
    s = c.secagg
    if s.num_shares and s.threshold and s.threshold >= s.num_shares:
        raise ConfigError(f"secagg.threshold={s.threshold} must be below secagg.num-shares={s.num_shares}")
    if s.enabled and c.clients_per_round < 3:
        raise ConfigError(f"secagg.enabled needs clients-per-round >= 3 (got {c.clients_per_round}): with fewer, "
                          "the sum would reveal a single client's update")
    if s.enabled and c.num_clients << s.quantization_bits >= 2**32:
        raise ConfigError(f"secagg.quantization-bits={s.quantization_bits} overflows the 32-bit sum of up to "
                          f"{c.num_clients} clients; use at most {31 - int(math.log2(c.num_clients))}")
    if c.user_dp.noise_cohort_size and c.user_dp.noise_cohort_size < c.clients_per_round:
        raise ConfigError(f"user-dp.noise-cohort-size={c.user_dp.noise_cohort_size} is below clients-per-round="
                          f"{c.clients_per_round}: it simulates a larger cohort; use 0 (off) or at least "
                          f"{c.clients_per_round}")
    if c.strategy.name in ROBUST_STRATEGIES and (s.enabled or c.user_dp.enabled):
        raise ConfigError(f"strategy.name={c.strategy.name} needs each client's update, but secure aggregation and "
                          "user-level DP hand the strategy only their sum; use fedavg, fedadam, fedprox, fedavgm, "
                          "fedyogi or fedadagrad with them")
    if c.hive.k > 1 and c.user_dp.enabled:
        raise ConfigError(f"hive.k={c.hive.k} with user-dp.enabled: user-level noise per specialist is not "
                          "accounted yet; use hive.k=1 or user-dp.enabled=false")
    if c.data.path and c.data.corpus != "plays":
        raise ConfigError(f"data.corpus={c.data.corpus} names an embedded corpus, but data.path={c.data.path} "
                          "is set; leave one of them at its default")
    if c.data.corpus != "plays" and c.data.partitioner != "natural":
        raise ConfigError(f"data.partitioner={c.data.partitioner} deals the plays only; data.corpus="
                          f"{c.data.corpus} has natural clients (modules)")
    if c.base.hidden_size % c.base.heads:
        raise ConfigError(
            f"base.hidden-size={c.base.hidden_size} must be a multiple of base.heads={c.base.heads}"
        )


def flatten(table: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """TOML tables to flat dotted keys: {'lora': {'r': 8}} -> {'lora.r': 8}."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def load_toml(path: Path) -> dict[str, Any]:
    """Flat keys from a TOML experiment file; a `[config]` table is used when present."""
    try:
        table = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path}: not valid TOML ({exc})") from None
    return flatten(table.get("config", table))


def parse_assignment(text: str) -> tuple[str, Any]:
    """`key=value` from the command line; the value is typed later, by the key."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def describe_keys() -> list[tuple[str, Any, str]]:
    """(key, default, what is allowed / what it does) for every key, for `fedllm keys`."""
    rows = []
    defaults = Config().to_flat()
    for key, path in KEYS.items():
        meta = _field(path).metadata
        note = "; ".join(x for x in (meta["allowed"], meta["doc"]) if x)
        rows.append((key, defaults[key], note))
    return rows
