"""The wire contract: every record, field and metric name that crosses between server and
device, defined once. Client, server, validation and tests import these names; no
Flower import here, so the contract reads without the transport.

A message's content is a set of named records (Flower's `RecordDict`):

    train request     ARRAYS (the global adapter; a hive's specialists as hive-j/<key>), CONFIG (the flat config and REQUEST_FIELDS)
    train reply       CLIENT; and either ARRAYS (the delta) + METRICS (TRAIN_METRICS), or
                      CLIENT.declined set; PRIVACY when the device keeps a ledger
    evaluate request  ARRAYS, CONFIG (PERSONALISE asks for personal and local-only metrics too)
    evaluate reply    METRICS (EVAL_METRICS, or PERSONAL_EVAL_METRICS; and SPECIALIST in a plain hive run), CLIENT,
                      PRIVACY after charged personal steps or a charged choice of specialist
    query request     CONFIG
    query reply       METRICS (QUERY_METRICS), CLIENT

Rules, as for the run directory: a name is never reused with another meaning; a new field
is added (and the reply lists below extended), never renamed; validation rejects any
record or field a reply may not carry, so a reply outside this contract never counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Records.
ARRAYS = "arrays"  # the global adapter (requests) or this client's delta (train replies)
CONFIG = "config"
METRICS = "metrics"
CLIENT = "client"
PRIVACY = "privacy"

# Fields of the CLIENT record.
CLIENT_ID = "client-id"
DECLINED = "declined"
CLIENT_FIELDS = frozenset({CLIENT_ID, DECLINED})
MAX_CLIENT_ID = 128  # characters of a client id, printable: longer or stranger ids are refused
# The one field of the PRIVACY record: the device's epsilon report, JSON text.
REPORT = "report"

# Fields the server adds to the config record of a request (next to the flat config keys).
SERVER_ROUND = "server-round"
RUN_ID = "run-id"
PROXIMAL_MU = "proximal-mu"  # FedProx's proximal term, read by the device's local loop
PERSONALISE = "personalise"  # evaluate: also personalise and train the local-only baseline
ADAPTER_KEYS = "adapter-keys"  # secure rounds: the order of the tensors in the legacy Parameters list
REQUEST_FIELDS = frozenset({SERVER_ROUND, RUN_ID, PROXIMAL_MU, PERSONALISE, ADAPTER_KEYS})

# Metrics.
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
STEPS = "steps"
EPSILON = "epsilon"
TRAIN_METRICS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, STEPS, EPSILON})
SPECIALIST = "specialist"  # hive.k > 1, plain rounds: which specialist the delta is for (fedllm.hive)
EVAL_VALUES = ("loss", "perplexity", "top1", "top3", "tokens")  # fedllm.evaluate.METRICS
SUMMARY_VALUES = EVAL_VALUES[:4]  # what is averaged over clients and compared between models
PERSONAL_DECLINED = "personal-declined"
EVAL_METRICS = frozenset({NUM_EXAMPLES, *EVAL_VALUES})
PERSONAL_EVAL_METRICS = EVAL_METRICS | {f"{who}-{m}" for who in ("personal", "local") for m in SUMMARY_VALUES} | {
    PERSONAL_DECLINED}
NUM_RECORDS = "num-records"
NUM_HELDOUT = "num-heldout"
QUERY_METRICS = frozenset({NUM_RECORDS, NUM_HELDOUT})

# What each reply may carry: record name -> allowed fields (None: any adapter key).
TRAIN_REPLY = {ARRAYS: None, METRICS: TRAIN_METRICS, CLIENT: CLIENT_FIELDS, PRIVACY: frozenset({REPORT})}
EVAL_REPLY = {METRICS: PERSONAL_EVAL_METRICS, CLIENT: CLIENT_FIELDS, PRIVACY: frozenset({REPORT})}
QUERY_REPLY = {METRICS: QUERY_METRICS, CLIENT: CLIENT_FIELDS}
# A secure round's FitRes carries only these in the clear (flattened into its metrics); its
# training metrics travel masked, as one more tensor (fedllm.secure_metrics).
SECURE_METRICS = CLIENT_FIELDS | {REPORT}

# Node config keys a device's operator sets (`fedllm client`), read by the device only.
NODE_DATA_PATH = "data-path"
NODE_CLIENT_ID = "client-id"
NODE_STATE_DIR = "state-dir"
NODE_MODEL = "model"
NODE_CACHE_DIR = "cache-dir"
NODE_DEVICE = "device"  # where this device trains (`fedllm client --device`)
NODE_DTYPE = "dtype"  # the frozen base's precision (`fedllm client --dtype`)
NODE_REQUIRE_SECAGG = "require-secagg"
NODE_PARTITION = "partition-id"  # simulation: which of the run's clients this node is
NODE_WORKER = "worker-dir"  # the device's resident worker (fedllm.deploy.device_worker): its socket and key


@dataclass
class TrainReply:
    """A device's train reply as plain data: what `client/app.py` turns into records."""

    client_id: str
    declined: str = ""
    delta: dict[str, Any] | None = None  # key -> tensor; None when declined
    metrics: dict[str, float] = field(default_factory=dict)
    report: dict[str, Any] | None = None  # the epsilon report, when the device keeps a ledger


@dataclass
class EvalReply:
    client_id: str
    metrics: dict[str, float]
    report: dict[str, Any] | None = None  # after charged personal steps
