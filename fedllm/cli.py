"""The `fedllm` command.

    fedllm simulate [--config FILE] [--set KEY=VALUE ...] [--run-dir DIR]
    fedllm sweep --config GRID.toml --out DIR [--tracking auto|tensorboard|none]
    fedllm base build [--config FILE] [--set KEY=VALUE ...]
    fedllm base shape NAME --out DIR [--set KEY=VALUE ...]
    fedllm audit RUN_DIR | STATE_STORE [--tolerance T] [--state-dir DIR] [--keys FILE] [--out DIR]
    fedllm audit canary [--config FILE] [--set KEY=VALUE ...] --run-dir DIR [--canaries M] [--guesses R]
    fedllm certs DIR [--nodes N] [--host HOST ...]
    fedllm server --certs DIR | --ca-cert F --cert F --key F  --nodes DIR --run-dir DIR [--config FILE] [--set ...]
    fedllm server register KEY --run-dir DIR
    fedllm client --superlink HOST:PORT --ca-cert F --key F --data PATH --state-dir DIR [--require-secagg]
                  [--require-dp] [--max-epsilon E] [--max-delta D] [--require-user-dp] [--model NAME]
                  [--device auto|cpu|cuda[:N]|mps] [--dtype auto|float32|bfloat16|float16]
                  [--personalise-on-new-data] [--train-window HH:MM-HH:MM] [--require-ac-power]
                  [--max-threads N] [--max-participations-per-day N] [--max-restarts N] [--backoff-max S]
    fedllm client status --state-dir DIR [--client-id ID]
    fedllm client key --state-dir DIR [--client-id ID]
    fedllm generate --state-dir DIR [--client-id ID] [--adapter personal|global|base|hive] [--prompt TEXT | -]
                    [--max-new-tokens N] [--temperature T] [--seed S]
    fedllm export --state-dir DIR [--client-id ID] --out OUT [--format hf|onnx|gguf] [--adapter ...]
    fedllm keys
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedllm.config import Config, describe_keys, load_toml, parse_assignment
from fedllm.errors import FedllmError


def _overrides(assignments: list[str]) -> dict[str, str]:
    return dict(parse_assignment(a) for a in assignments)


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="experiment TOML file (default: simulations/default.toml)")
    parser.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config key; repeatable")


def cmd_simulate(args: argparse.Namespace) -> int:
    from fedllm import simulate as runner
    from fedllm.plots import Progress, format_summary
    from fedllm.rundir import default_run_dir

    overrides = _overrides(args.assignments)
    if args.run_dir:
        overrides["run-dir"] = str(args.run_dir)
    config = runner.load_experiment(args.config, overrides)
    run_dir = Path(config.run_dir) if config.run_dir else default_run_dir()
    config = config.with_values({"run-dir": str(run_dir)})
    print(f"fedllm simulate: {config.num_clients} clients, {config.clients_per_round} per round, "
          f"{config.num_server_rounds} rounds -> {run_dir}", flush=True)
    progress = Progress(config.num_server_rounds)

    def show(record: dict) -> None:
        if (line := progress.line(record)) is not None:
            print(line, flush=True)

    summary = runner.simulate(config, run_dir, on_round=show)
    print()
    print(format_summary(summary))
    print(f"\nrun directory: {run_dir} (Flower's and the workers' output: {run_dir / 'simulation.log'})")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedllm.sweep import load_grid, run_sweep

    grid = load_grid(args.config)  # every cell checked before anything runs
    run_sweep(grid, args.out, tracking=args.tracking)
    print((args.out / "sweep.md").read_text())
    return 0


def cmd_base_build(args: argparse.Namespace) -> int:
    from fedllm.model import resolve_base

    values = load_toml(args.config) if args.config else {}
    values.update(_overrides(args.assignments))
    config = Config.from_flat(values)
    if config.model.name != "builtin":
        raise FedllmError(f"model.name={config.model.name}: `fedllm base build` builds only the built-in base")
    print(resolve_base(config))
    return 0


def cmd_base_shape(args: argparse.Namespace) -> int:
    from fedllm.shapes import build_shape

    overrides = {}
    for key, value in _overrides(args.assignments).items():
        try:
            overrides[key] = int(value)
        except ValueError:
            raise FedllmError(f"--set {key}={value}: expected an integer") from None
    info = build_shape(args.name, args.out, overrides)
    print(f"{args.out}: {info['shape']} shape, {info['parameters']:,} parameters, random weights (cost figures "
          f"only); use it with --set model.name={args.out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Exit 0 when every check passes, 1 when any fails (each failure is named)."""
    from fedllm.audit.records import audit_path
    from fedllm.audit.report import table, write_reports

    if not 0 <= args.tolerance < 1:
        raise FedllmError(f"--tolerance={args.tolerance}: give a relative tolerance in [0, 1), e.g. 0.01")
    from fedllm.audit.trust import read_keys

    keys = read_keys(args.keys) if args.keys else None
    audit = audit_path(args.path, args.tolerance, args.state_dir, keys)
    out = args.out or (args.path if args.path.is_dir() else args.path.parent) / "audit"
    written = write_reports(audit, out)
    print(table(audit))
    print(f"\nreport: {written[0]}  {written[1]}")
    return 1 if audit.failures else 0


def cmd_audit_canary(args: argparse.Namespace) -> int:
    from fedllm.audit import canary_run as canary

    result = canary.run(args.config, _overrides(args.assignments), args.run_dir, args.canaries, args.guesses,
                        args.seed)
    print(canary.format_result(result))
    return 0


def cmd_certs(args: argparse.Namespace) -> int:
    from fedllm.deploy.certs import make_certs

    made = make_certs(args.dir, args.nodes, args.host or ["127.0.0.1", "localhost"])
    d = args.dir
    print(f"CA: {made['ca']}  server: {made['server_cert']}, {made['server_key']}")
    print(f"node keys: {', '.join(str(v) for k, v in made.items() if k.startswith('node-'))} (+ .pub)")
    print(f"""
Try it on one machine, in three terminals (add more devices with more node keys):

  fedllm server --certs {d} --nodes {d}/nodes --run-dir runs/fleet --config simulations/tiny.toml \\
      --set num-clients=2 --set clients-per-round=2 --set evaluate.num-clients=2
  fedllm client --superlink 127.0.0.1:9093 --ca-cert {d}/ca.crt --key {d}/nodes/node-1 --data DEVICE1.jsonl --state-dir state/node-1 --port 9101
  fedllm client --superlink 127.0.0.1:9093 --ca-cert {d}/ca.crt --key {d}/nodes/node-2 --data DEVICE2.jsonl --state-dir state/node-2 --port 9102

`fedllm server` registers every {d}/nodes/*.pub with the SuperLink (Flower's `flwr supernode register`);
a node whose public key is not registered is refused. Give each device only its own private key and ca.crt.""")
    return 0


def _server_files(args: argparse.Namespace) -> tuple[Path | None, Path | None, Path | None]:
    certs = args.certs
    return (args.ca_cert or (certs / "ca.crt" if certs else None), args.cert or (certs / "server.pem" if certs else None),
            args.key or (certs / "server.key" if certs else None))


def cmd_server(args: argparse.Namespace) -> int:
    from fedllm.deploy.server import node_keys, serve
    from fedllm.plots import format_summary

    values = load_toml(args.config) if args.config else {}
    values.update(_overrides(args.assignments))
    devices = len(node_keys(args.nodes))
    values.setdefault("num-clients", devices)  # by default, every registered device takes part
    values.setdefault("clients-per-round", min(int(values["num-clients"]), Config().clients_per_round))
    config = Config.from_flat(values)
    if config.num_clients > devices:
        raise FedllmError(f"num-clients={config.num_clients} but {args.nodes} holds {devices} node keys: the run "
                          f"would wait for devices that cannot join; use --set num-clients={devices} or add keys")
    ca_cert, cert, key = _server_files(args)
    summary = serve(config, args.run_dir, ca_cert=ca_cert, cert=cert, key=key, nodes=args.nodes, host=args.host,
                    port=args.port, local_port=args.local_port)
    print()
    print(format_summary(summary))
    print(f"\nrun directory: {args.run_dir}")
    return 0


def cmd_server_register(args: argparse.Namespace) -> int:
    from fedllm.deploy.server import register

    node_id = register(args.key, args.run_dir)
    print(f"node key {args.key}: " + (f"registered as node {node_id}" if node_id else "already registered"))
    return 0


def cmd_client(args: argparse.Namespace) -> int:
    from fedllm.deploy.daemon import run_daemon

    if args.max_restarts < -1 or args.backoff_max <= 0:
        raise FedllmError("--max-restarts must be >= -1 (-1: always restart) and --backoff-max > 0 seconds")
    return run_daemon(max_restarts=args.max_restarts, backoff_max=args.backoff_max, superlink=args.superlink, ca_cert=args.ca_cert, key=args.key, data=args.data,
               state_dir=args.state_dir, client_id=args.client_id, port=args.port,
               require_secagg=args.require_secagg, require_dp=args.require_dp, max_epsilon=args.max_epsilon,
               max_delta=args.max_delta, require_user_dp=args.require_user_dp, model=args.model,
               device=args.device, dtype=args.dtype, personalise_on_new_data=args.personalise_on_new_data,
               train_window=args.train_window, require_ac_power=args.require_ac_power, max_threads=args.max_threads,
               max_participations_per_day=args.max_participations_per_day, resident=not args.no_resident_worker)


def cmd_client_status(args: argparse.Namespace) -> int:
    from fedllm.device_status import status_lines
    from fedllm.state import find_store

    for line in status_lines(find_store(args.state_dir, args.client_id)):
        print(line)
    return 0


def cmd_client_key(args: argparse.Namespace) -> int:
    import json

    from fedllm.privacy.signing import device_key, public_hex
    from fedllm.state import find_store

    store = find_store(args.state_dir, args.client_id)
    print(json.dumps({store.client_id: public_hex(device_key(store.dir))}))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from fedllm.personal_model import generate, load_device_model
    from fedllm.state import find_store

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    device_model = load_device_model(find_store(args.state_dir, args.client_id), args.adapter, prompt=prompt)
    if device_model.specialist is not None:
        print(f"specialist {device_model.specialist} of {device_model.config.hive.k}"
              + (" (routed on the prompt)" if args.adapter == "hive" else " (the device's choice)"), file=sys.stderr)
    text, _ = generate(device_model.model, device_model.tokenizer, prompt, args.max_new_tokens, args.temperature,
                       args.seed)
    print(prompt + text)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fedllm.export import export
    from fedllm.state import find_store

    result = export(find_store(args.state_dir, args.client_id), args.out, args.format, args.adapter)
    for line in result.lines():
        print(line)
    return 0


def _add_store_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state-dir", type=Path, required=True,
                        help="the device's state store (`fedllm client --state-dir`, or a simulation's "
                             "RUN_DIR/clients)")
    parser.add_argument("--client-id", default="", help="which client, where the store holds several")


def _add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", default="personal", choices=("personal", "global", "base", "hive"),
                        help="personal: base + global + personal adapter (default); global: base + the latest "
                             "global adapter (a hive's: the specialist this device chose); base: the base alone; "
                             "hive: the specialist with the lowest loss on the prompt")


def cmd_keys(args: argparse.Namespace) -> int:
    for key, default, note in describe_keys():
        print(f"{key:<28} {default!r:<12} {note}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedllm", description="Federated LoRA personalisation of small LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a federated simulation on Flower's simulation engine")
    _add_config_args(sim)
    sim.add_argument("--run-dir", type=Path, help="where the run writes its files (default: runs/<time>)")
    sim.set_defaults(func=cmd_simulate)

    sweep = sub.add_parser("sweep", help="a grid of simulations: sweep.csv, sweep.md and frontier.png (what privacy "
                                         "costs)", description="Run every cell of a grid file (TOML: base, seeds, "
                           "[set], [grid]; see fedllm.sweep) as a fedllm simulate run under DIR/runs/, one after "
                           "another; finished cells are never rerun, a crashed one resumes.")
    sweep.add_argument("--config", type=Path, required=True, help="the grid file")
    sweep.add_argument("--out", type=Path, required=True, help="where the runs and the results go")
    sweep.add_argument("--tracking", choices=("auto", "tensorboard", "none"), default="auto",
                       help="TensorBoard event files per cell under DIR/tensorboard (auto: when installed)")
    sweep.set_defaults(func=cmd_sweep)

    base = sub.add_parser("base", help="the built-in base model")
    base_sub = base.add_subparsers(dest="base_command", required=True)
    build = base_sub.add_parser("build", help="build (or find cached) the built-in base and print its path")
    _add_config_args(build)
    build.set_defaults(func=cmd_base_build)
    shape = base_sub.add_parser("shape", help="write a randomly initialised model of a real architecture and size "
                                              "(cost measurements offline; no utility claim)")
    shape.add_argument("name", help="smollm2-135m or qwen2.5-0.5b")
    shape.add_argument("--out", type=Path, required=True, help="the model directory to write")
    shape.add_argument("--set", dest="assignments", action="append", default=[], metavar="KEY=VALUE",
                       help="a reduced size, e.g. num_hidden_layers=2 (hidden_size, num_hidden_layers, "
                            "num_attention_heads, num_key_value_heads, intermediate_size, vocab_size)")
    shape.set_defaults(func=cmd_base_shape)

    audit = sub.add_parser(
        "audit", help="check every epsilon claim of a run directory or state store; "
                      "`fedllm audit canary` runs the empirical one-run audit",
        description="Recompute every client's epsilon with dp-accounting, verify the ledgers' hash chains and "
                    "compare the charged rounds with the server's metrics. Writes audit/report.md and "
                    "audit/report.html; exits 1 when any check fails. See docs/auditing.md.")
    audit.add_argument("path", type=Path, help="a run directory, a client state store, or one ledger.json")
    audit.add_argument("--tolerance", type=float, default=0.01,
                       help="relative difference allowed between the claimed and the recomputed epsilon (0.01)")
    audit.add_argument("--state-dir", type=Path, help="the devices' state store, to compare their ledgers with the "
                                                      "server's copies (default: the run's privacy.state-dir or "
                                                      "RUN_DIR/clients when present)")
    audit.add_argument("--keys", type=Path, help="a JSON object client id -> public key (what `fedllm client key` "
                       "printed on each device): every report's signature is verified against it (default: the "
                       "signing.pub in each device's state store)")
    audit.add_argument("--out", type=Path, help="where to write the report (default: PATH/audit)")
    audit.set_defaults(func=cmd_audit)

    canary = sub.add_parser(
        "audit-canary", help=argparse.SUPPRESS, prog="fedllm audit canary",
        description="Empirical privacy audit in one training run (Steinke, Nasr, Jagielski 2023): insert canary "
                    "records, train as configured, guess which canaries were included, and turn the guesses "
                    "into an epsilon lower bound at 95% confidence. Writes RUN_DIR/audit/canary.json.")
    _add_config_args(canary)
    canary.add_argument("--run-dir", type=Path, required=True, help="where the audited run writes its files")
    canary.add_argument("--canaries", type=int, default=1000, help="m, the number of canaries (1000)")
    canary.add_argument("--guesses", type=int, default=None,
                        help="r, guesses to make: r/2 'in' from the top scores and r/2 'out' from the bottom "
                             "(default: m/10)")
    canary.add_argument("--seed", type=int, default=None, help="seed of canary drawing and inclusion "
                                                                "(default: fresh; recorded in canary.json)")
    canary.set_defaults(func=cmd_audit_canary)

    certs = sub.add_parser("certs", help="make a CA, a server certificate and node key pairs for trying a "
                                         "deployment")
    certs.add_argument("dir", type=Path, help="where to write them (must not hold a CA already)")
    certs.add_argument("--nodes", type=int, default=3, help="node key pairs to make (3)")
    certs.add_argument("--host", action="append", help="a name or IP address the server is reached at; repeatable "
                                                      "(default: 127.0.0.1 and localhost)")
    certs.set_defaults(func=cmd_certs)

    server = sub.add_parser("server", help="run the federation's server: a SuperLink (TLS, node authentication) "
                                           "and the fedllm ServerApp")
    _add_config_args(server)
    server.add_argument("--certs", type=Path, help="a directory made by `fedllm certs` (ca.crt, server.pem, "
                                                   "server.key)")
    server.add_argument("--ca-cert", type=Path, help="CA certificate (default: CERTS/ca.crt)")
    server.add_argument("--cert", type=Path, help="server certificate (default: CERTS/server.pem)")
    server.add_argument("--key", type=Path, help="server private key (default: CERTS/server.key)")
    server.add_argument("--nodes", type=Path, required=True, help="directory of the devices' *.pub keys to register")
    server.add_argument("--run-dir", type=Path, required=True, help="the run directory")
    server.add_argument("--host", default="127.0.0.1", help="device-facing address (127.0.0.1; 0.0.0.0 for all); "
                                                            "only the Fleet API is served there, through nginx")
    server.add_argument("--port", type=int, default=9093, help="the devices' port (9093)")
    server.add_argument("--local-port", type=int, default=9091,
                        help="loopback port of the SuperLink itself: Control and Runtime APIs (9091)")
    server.set_defaults(func=cmd_server)

    register = sub.add_parser("server-register", help=argparse.SUPPRESS, prog="fedllm server register",
                              description="Register a device's node public key with a running `fedllm server` on "
                                          "this machine (over the loopback Control API).")
    register.add_argument("key", type=Path, help="the device's node public key (*.pub)")
    register.add_argument("--run-dir", type=Path, required=True, help="the running server's run directory")
    register.set_defaults(func=cmd_server_register)

    client = sub.add_parser("client", help="the device daemon: a SuperNode running fedllm on this device's data")
    client.add_argument("--superlink", required=True, help="the server's address, host:port")
    client.add_argument("--ca-cert", type=Path, required=True, help="the CA certificate that signed the server's")
    client.add_argument("--key", type=Path, required=True, help="this device's private node key (registered)")
    client.add_argument("--data", type=Path, required=True, help="this device's records: a .txt/.jsonl file, or a "
                                                                 "folder holding one")
    client.add_argument("--state-dir", type=Path, required=True, help="where the ledger and personal adapters live")
    client.add_argument("--client-id", default="", help="name of this client (default: the data file's name)")
    client.add_argument("--port", type=int, default=9094, help="local port for the ClientApp process (9094; "
                                                               "distinct per daemon on one machine)")
    client.add_argument("--require-secagg", action="store_true",
                        help="refuse to train for a server that does not use secure aggregation: this device's "
                             "update then never leaves it unmasked")
    client.add_argument("--require-dp", action=argparse.BooleanOptionalAction, default=True,
                        help="train only with record-level DP-SGD (default; --no-require-dp allows non-private "
                             "rounds)")
    client.add_argument("--max-epsilon", type=float, default=8.0,
                        help="the largest privacy.target-epsilon this device accepts from a server (8)")
    client.add_argument("--max-delta", type=float, default=1e-5,
                        help="the largest privacy.delta this device accepts from a server (1e-5)")
    client.add_argument("--require-user-dp", action="store_true",
                        help="refuse rounds without user-level DP (user-dp.enabled)")
    client.add_argument("--model", default="builtin",
                        help="the base model this device loads: builtin, or a local model directory (never taken "
                             "from the server)")
    client.add_argument("--device", default="auto",
                        help="where this device trains: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    client.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="the frozen base's precision (auto: bfloat16 on a CUDA GPU that supports it); LoRA "
                             "weights and the deltas sent stay float32")
    client.add_argument("--max-restarts", type=int, default=-1,
                        help="restart the SuperNode at most this many times after it exits (-1: always, default)")
    client.add_argument("--backoff-max", type=float, default=60.0,
                        help="the longest wait between restarts, in seconds; waits double from 1 s (60)")
    client.add_argument("--train-window", default="", metavar="HH:MM-HH:MM",
                        help="train only in this local-time window (may cross midnight, e.g. 22:00-06:00); outside "
                             "it the device answers that it is not available (nothing charged)")
    client.add_argument("--require-ac-power", action="store_true",
                        help="train only on mains power, as the operating system reports it")
    client.add_argument("--max-threads", type=int, default=0, help="torch threads for training (0: torch's default)")
    client.add_argument("--max-participations-per-day", type=int, default=0,
                        help="train at most this many rounds per UTC day (0: no cap); written into the epsilon report")
    client.add_argument("--no-resident-worker", action="store_true",
                        help="load the model in every ClientApp process instead of keeping it in a resident worker")
    client.add_argument("--personalise-on-new-data", action="store_true",
                        help="at start, train the personal adapter again when records were appended to --data since "
                             "it was last trained (newest records held out; charged under DP)")
    client.set_defaults(func=cmd_client)

    status = sub.add_parser("client-status", help=argparse.SUPPRESS, prog="fedllm client status",
                            description="The device's personal adapter (version, round, records seen) and its "
                                        "ledger's epsilon, from its state store.")
    _add_store_args(status)
    status.set_defaults(func=cmd_client_status)

    key = sub.add_parser("client-key", help=argparse.SUPPRESS, prog="fedllm client key",
                         description="The public half of the device's report-signing key (made on first use), "
                                     "as JSON {client id: key}: what its operator gives `fedllm audit --keys`.")
    _add_store_args(key)
    key.set_defaults(func=cmd_client_key)

    gen = sub.add_parser("generate", help="generate text on this device from its own model (nothing is fetched)")
    _add_store_args(gen)
    _add_adapter_arg(gen)
    gen.add_argument("--prompt", default="", help="the text to continue; '-' reads it from standard input")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (64)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy (0.8)")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed: the same seed gives the same text (0)")
    gen.set_defaults(func=cmd_generate)

    exp = sub.add_parser("export", help="write the device's merged model for another runtime, verified")
    _add_store_args(exp)
    _add_adapter_arg(exp)
    exp.add_argument("--out", type=Path, required=True, help="a new, empty folder")
    exp.add_argument("--format", default="hf", choices=("hf", "onnx", "gguf"),
                     help="hf: safetensors for transformers (default); onnx: for onnxruntime, logits checked "
                          "against PyTorch")
    exp.set_defaults(func=cmd_export)

    keys = sub.add_parser("keys", help="list every config key with its default")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["audit", "canary"]:  # a sub-command of `audit`, whose first argument is otherwise a path
        argv = ["audit-canary", *argv[2:]]
    if argv[:2] in (["client", "status"], ["client", "key"]):
        argv = [f"client-{argv[1]}", *argv[2:]]
    if argv[:2] == ["server", "register"]:
        argv = ["server-register", *argv[2:]]
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FedllmError as exc:
        print(f"fedllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedllm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
