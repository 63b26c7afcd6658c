"""`fedllm sweep`: a grid of real simulations, and what privacy costs in one table and plot.

A grid file (TOML) names an experiment, fixed overrides, keys to lists of values and seeds:

    base = "simulations/tiny.toml"          # optional; the default experiment otherwise
    seeds = [0, 1]                           # optional; [the experiment's seed]
    [set]
    num-server-rounds = 4
    [grid]
    "privacy.target-epsilon" = [2.0, 8.0]
    "privacy.enabled" = [true, false]
    [variants.small]                         # optional: named sets of keys swept together
    "lora.r" = 1

Every cell is checked as a config before anything runs. Cells that are the same run (keys
with no effect under the others: `privacy.*` without DP) are run once. Each cell is a
`fedllm simulate` run in DIR/runs/<name>; a cell with a summary.json is done and never
rerun, one without is resumed (the run directory's own resume). The results are collected
from the run directories, never from memory, so a table written after a crash is whole.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from fedllm import atomic
from fedllm.config import Config, flatten, load_toml
from fedllm.errors import ConfigError, FedllmError
from fedllm.rundir import RunDir, in_use_refused

GRID_FIELDS = ("base", "seeds", "set", "grid", "variants")
VARIANT = "variant"  # the grid dimension of [variants.NAME] tables: named sets of keys swept together
# keys a sweep owns: each cell's run directory is its own
SWEEP_OWNS = ("run-dir",)
# what stays the same for a fair comparison: the devices, rounds and seeds (a private row is
# compared with the best non-private row that shares these)
POPULATION_PREFIXES = ("num-server-rounds", "num-clients", "clients-per-round", "data.", "evaluate.", "seed",
                       "base.", "model.")
MAX_CELLS = 10_000


@dataclass
class Cell:
    """One run of the grid: the swept values (key -> value, seed included) and its config."""

    values: dict[str, Any]
    config: Config
    name: str


@dataclass
class Grid:
    base: Path | None
    fixed: dict[str, Any]
    keys: list[str]
    seeds: list[int]
    cells: list[Cell] = field(default_factory=list)


def load_grid(path: Path | str) -> Grid:
    """The grid file, every cell checked as a config (unknown keys, refused values) before
    any runs: a sweep that would fail at its tenth cell fails now, naming the key."""
    import tomllib

    path = Path(path)
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"grid file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"grid file {path}: not valid TOML ({exc})") from None
    unknown = sorted(set(table) - set(GRID_FIELDS))
    if unknown:
        raise ConfigError(f"grid file {path}: unknown field(s) {unknown}; expected {list(GRID_FIELDS)} "
                          "(config keys go in [set] or [grid])")
    base = _base_path(path, table.get("base"))
    fixed = flatten(_table(path, table, "set"))
    swept = flatten(_table(path, table, "grid"))
    for key in (*fixed, *swept):
        if key in SWEEP_OWNS:
            raise ConfigError(f"grid file {path}: {key!r} is the sweep's own (each cell gets DIR/runs/<cell>)")
    for key, values in swept.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"grid file {path}: [grid] {key!r} must be a non-empty list of values, got {values!r}")
        if any(isinstance(v, (list, dict)) for v in values):
            raise ConfigError(f"grid file {path}: [grid] {key!r}: each value must be a number, string or boolean")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"grid file {path}: [grid] {key!r} lists a value twice: {values!r}")
    variants = _variants(path, table)
    if variants:
        swept[VARIANT] = list(variants)
    overlap = sorted(set(fixed) & set(swept))
    if overlap:
        raise ConfigError(f"grid file {path}: {overlap} in both [set] and [grid]; keep each key in one")
    experiment = load_toml(base) if base else _default_experiment()
    seeds = table.get("seeds", [experiment.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds or not all(type(s) is int and 0 <= s < 2**31 for s in seeds) \
            or len(set(seeds)) != len(seeds):
        raise ConfigError(f"grid file {path}: seeds must be a non-empty list of distinct integers in 0..2**31-1, "
                          f"got {seeds!r}")
    if "seed" in swept or "seed" in fixed:
        raise ConfigError(f"grid file {path}: give seeds as `seeds = [...]`, not as the key 'seed'")
    grid = Grid(base, fixed, list(swept), seeds)
    combos = list(itertools.product(*swept.values()))
    if len(combos) * len(seeds) > MAX_CELLS:
        raise ConfigError(f"grid file {path}: {len(combos) * len(seeds)} cells; at most {MAX_CELLS}")
    seen: dict[str, Cell] = {}
    for combo in combos:
        for seed in seeds:
            values = {**dict(zip(swept, combo)), "seed": seed}
            chosen = {k: v for k, v in values.items() if k != VARIANT}
            try:
                config = Config.from_flat({**experiment, **fixed, **chosen, **variants.get(values.get(VARIANT), {})})
            except ConfigError as exc:
                shown = ", ".join(f"{k}={v}" for k, v in values.items())
                raise ConfigError(f"grid file {path}: the cell {shown}: {exc}") from None
            identity = _identity(config)
            if identity in seen:  # the same run under another name (a key with no effect here)
                continue
            seen[identity] = cell = Cell(values, config, _name(len(seen), values, identity))
            grid.cells.append(cell)
    return grid


def _variants(path: Path, table: dict) -> dict[str, dict[str, Any]]:
    """[variants.NAME] tables: each a set of config keys that go together (the DP levers,
    user-level DP), swept as the `variant` dimension; a variant's keys win over [grid]'s."""
    variants = _table(path, table, "variants")
    out = {}
    for name, keys in variants.items():
        if not isinstance(keys, dict):
            raise ConfigError(f"grid file {path}: [variants.{name}] must be a table of config keys")
        flat = flatten(keys)
        if any(k in SWEEP_OWNS or k == "seed" for k in flat):
            raise ConfigError(f"grid file {path}: [variants.{name}] may not set run-dir or seed")
        out[str(name)] = flat
    return out


def _table(path: Path, table: dict, name: str) -> dict:
    value = table.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(f"grid file {path}: [{name}] must be a table of config keys")
    return value


def _base_path(grid_file: Path, base: Any) -> Path | None:
    """`base`: relative to the grid file, else to the working directory, else a packaged
    experiment name (`tiny.toml`)."""
    if base is None:
        return None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"grid file {grid_file}: base must be the path of an experiment file, got {base!r}")
    from fedllm.simulate import experiment_path

    for candidate in (grid_file.parent / base, Path(base), experiment_path(Path(base).name)):
        if candidate.is_file():
            return candidate
    raise ConfigError(f"grid file {grid_file}: base {base!r} is no experiment file (looked beside the grid file, "
                      "in the working directory and among the packaged experiments)")


def _default_experiment() -> dict[str, Any]:
    from fedllm.simulate import experiment_path

    return load_toml(experiment_path())


# (switch, its value that turns a feature off, the keys that then have no effect)
INERT_WHEN = (("privacy.enabled", False, "privacy."), ("user-dp.enabled", False, "user-dp."),
              ("secagg.enabled", False, "secagg."), ("personal.method", "none", "personal."),
              ("hive.k", 1, "hive."))


def _identity(config: Config) -> str:
    """What makes two cells the same run: their configs, without the keys that have no
    effect in them (`privacy.*` when privacy is off, and so on)."""
    flat = config.to_flat()
    for switch, off, prefix in INERT_WHEN:
        if flat[switch] == off:
            flat = {k: v for k, v in flat.items() if not k.startswith(prefix) or k == switch}
    flat.pop("run-dir", None)
    return hashlib.sha256(json.dumps(flat, sort_keys=True).encode()).hexdigest()


def _name(index: int, values: dict[str, Any], identity: str) -> str:
    short = "-".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items())
    safe = "".join(c if c.isalnum() or c in "=-._" else "_" for c in short)[:80]
    return f"{index:03d}-{safe}-{identity[:8]}"


# -- running ---------------------------------------------------------------------------------
CELL_FILE = "cell.json"


def done(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_sweep(grid: Grid, out: Path, run: Callable[[Config, Path], Any] | None = None,
              log: Callable[[str], None] = print, tracking: str = "auto") -> list[dict[str, Any]]:
    """Run every unfinished cell, one after another, then write sweep.csv, sweep.md and
    frontier.png; returns the rows. `run(config, run_dir)` is fedllm's simulate."""
    with in_use_refused(Path(out), "sweep", "--out") as out:
        return _run_sweep(grid, out, run, log, tracking)


def _run_sweep(grid: Grid, out: Path, run: Callable[[Config, Path], Any] | None, log: Callable[[str], None],
               tracking: str) -> list[dict[str, Any]]:
    runs = atomic.private_dir(out / "runs")
    _check_cells_match(grid, runs)
    run = run or _simulate
    todo = [c for c in grid.cells if not done(runs / c.name)]
    log(f"fedllm sweep: {len(grid.cells)} cells, {len(grid.cells) - len(todo)} done, {len(todo)} to run -> {out}")
    started, took = time.time(), []
    for i, cell in enumerate(todo, 1):
        run_dir = runs / cell.name
        atomic.private_dir(run_dir)
        atomic.write_json(run_dir / CELL_FILE, {"values": cell.values, "name": cell.name})
        shown = ", ".join(f"{k}={v}" for k, v in cell.values.items())
        eta = f", about {statistics.fmean(took) * (len(todo) - i + 1) / 60:.0f} min left" if took else ""
        log(f"[{i}/{len(todo)}] {shown}{eta}")
        t0 = time.time()
        run(cell.config.with_values({"run-dir": str(run_dir)}), run_dir)
        took.append(time.time() - t0)
        r = row(cell, run_dir)
        log(f"    global perplexity {_fmt(r['global_perplexity'])} (base {_fmt(r['base_perplexity'])}), epsilon "
            f"median {_fmt(r['epsilon_median']) or '-'}, {took[-1]:.0f} s")
    rows = collect(grid, runs)
    write_results(grid, rows, out)
    trackers = track(grid, rows, out / "tensorboard", tracking)
    log(f"fedllm sweep: {len(rows)} rows in {out / 'sweep.csv'}, {out / 'sweep.md'}, {out / 'frontier.png'}"
        + (f"; TensorBoard: tensorboard --logdir {out / 'tensorboard'}" if trackers else "")
        + (f" ({time.time() - started:.0f} s)" if todo else ""))
    return rows


def _check_cells_match(grid: Grid, runs: Path) -> None:
    """A cell folder holds the run its name says: a grid edited under the same DIR must not
    mix old runs into the new table."""
    for cell in grid.cells:
        recorded = runs / cell.name / CELL_FILE
        if recorded.is_file():
            try:
                values = json.loads(recorded.read_text()).get("values")
            except (OSError, ValueError, AttributeError):
                values = None
            if values != json.loads(json.dumps(cell.values)):
                raise ConfigError(f"{recorded} records another cell than {cell.name}: move {recorded.parent} aside "
                                  "or give the sweep another --out")


def _simulate(config: Config, run_dir: Path) -> None:
    from fedllm.simulate import simulate

    simulate(config, run_dir)


# -- results ---------------------------------------------------------------------------------
def collect(grid: Grid, runs: Path) -> list[dict[str, Any]]:
    """One row per finished cell, read back from its run directory."""
    rows = []
    for cell in grid.cells:
        run_dir = runs / cell.name
        if done(run_dir):
            rows.append(row(cell, run_dir))
    _gain_kept(rows, grid)
    return rows


def row(cell: Cell, run_dir: Path) -> dict[str, Any]:
    """What a researcher compares: perplexity and loss overall and per corpus kind (base,
    global, personalised), epsilon spent, user-level epsilon, upload and wall time."""
    summary = _summary(run_dir)
    metrics = RunDir.existing(run_dir).metrics()
    evaluated = [_dict(m.get("evaluate")) for m in metrics if _dict(_dict(m.get("evaluate")).get("clients"))]
    out: dict[str, Any] = {**cell.values, "privacy.enabled": cell.config.privacy.enabled,
                           "privacy.target-epsilon": cell.config.privacy.target_epsilon,
                           "user-dp.enabled": cell.config.user_dp.enabled}
    for name in ("base", "global", "personalised"):
        part = _dict(summary.get(name))
        out[f"{name}_perplexity"], out[f"{name}_loss"] = _num(part.get("perplexity")), _num(part.get("loss"))
    if evaluated:
        kinds = _kinds(cell.config)
        first, last = evaluated[0]["clients"], evaluated[-1]["clients"]
        for kind in sorted({k for k in kinds.values() if k}):
            for name, per_client, prefix in (("base", first, ""), ("global", last, ""),
                                             ("personalised", last, "personal-")):
                values = [(_num(_dict(m).get(f"{prefix}perplexity")), _num(_dict(m).get(f"{prefix}loss")))
                          for c, m in per_client.items() if kinds.get(c) == kind]
                values = [v for v in values if None not in v]
                if values:
                    out[f"{kind}_{name}_perplexity"] = statistics.fmean(p for p, _ in values)
                    out[f"{kind}_{name}_loss"] = statistics.fmean(loss for _, loss in values)
    eps = _dict(_dict(summary.get("privacy")).get("epsilon"))
    out.update({"epsilon_min": _num(eps.get("min")), "epsilon_median": _num(eps.get("median")),
                "epsilon_max": _num(eps.get("max")),
                "user_epsilon": _num(_dict(summary.get("user_level_privacy")).get("epsilon")),
                "upload_bytes": _num(summary.get("upload_bytes_per_client_round")),
                "wall_seconds": _num(summary.get("wall_seconds")), "run_dir": str(run_dir)})
    return out


def _summary(run_dir: Path) -> dict[str, Any]:
    """A cell's summary.json (on disk, so checked): a JSON object, or an error naming it."""
    path = run_dir / "summary.json"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        summary = exc
    if not isinstance(summary, dict):
        raise FedllmError(f"{path} is not a run summary ({str(summary)[:80]}); move it aside and start the sweep "
                          "again: that cell resumes and writes it anew")
    return summary


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _num(value: Any) -> float | None:
    """A finite number read back from a run directory, else None (an empty cell)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def row_kinds(rows: list[dict[str, Any]]) -> list[str]:
    """The corpus kinds the rows have figures for ("code", "verse")."""
    return sorted({k.split("_", 1)[0] for r in rows for k in r if k.endswith("_global_loss")})


def _kinds(config: Config) -> dict[str, str]:
    """client -> corpus kind ("verse", "code"; "" for a user's data)."""
    from fedllm.data import load_clients

    try:
        return {c.client_id: c.kind for c in load_clients(config)}
    except Exception:  # noqa: BLE001 - a data set that moved since: the row keeps its overall figures
        return {}


def _population(values: dict[str, Any], keys: list[str]) -> tuple:
    return tuple((k, values.get(k)) for k in keys if k.startswith(POPULATION_PREFIXES))


def _gain_kept(rows: list[dict[str, Any]], grid: Grid) -> None:
    """gain_kept: (base - private) / (base - best non-private) in held-out loss (nats), the
    reference being the best non-private row on the same devices, rounds and seed."""
    keys = [*grid.keys, "seed"]
    for kind in ("", *row_kinds(rows)):
        prefix = f"{kind}_" if kind else ""
        best: dict[tuple, float] = {}
        for r in rows:
            loss = r.get(f"{prefix}global_loss")
            if not private(r) and loss is not None:
                group = _population(r, keys)
                best[group] = min(best.get(group, loss), loss)
        for r in rows:
            base, loss = r.get(f"{prefix}base_loss"), r.get(f"{prefix}global_loss")
            ref = best.get(_population(r, keys))
            gain = None if None in (base, loss, ref) or base - ref <= 0 else (base - loss) / (base - ref)
            r[f"{prefix}gain_kept"] = gain


def private(r: dict[str, Any]) -> bool:
    """Record-level or user-level DP: a row that is no non-private reference."""
    return bool(r.get("privacy.enabled")) or bool(r.get("user-dp.enabled"))


def columns(grid: Grid, rows: list[dict[str, Any]]) -> list[str]:
    first = [*grid.keys, "seed"]
    first += [k for k in ("privacy.enabled", "privacy.target-epsilon", "user-dp.enabled") if k not in first]
    rest = [k for r in rows for k in r if k not in first]
    ordered = []
    for k in rest:
        if k not in ordered:
            ordered.append(k)
    tail = ["run_dir"]
    return first + [k for k in ordered if k not in tail] + tail


def write_results(grid: Grid, rows: list[dict[str, Any]], out: Path) -> None:
    names = columns(grid, rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in names})
    atomic.write_bytes(out / "sweep.csv", buffer.getvalue().encode())
    atomic.write_bytes(out / "sweep.md", table(grid, rows).encode())
    frontier(grid, rows, out / "frontier.png")


def table(grid: Grid, rows: list[dict[str, Any]]) -> str:
    """sweep.md: the swept keys, then what each row learned and spent."""
    kinds = row_kinds(rows)
    shown = [*grid.keys, "seed"] + [k for k in ("privacy.target-epsilon",) if k not in grid.keys]
    figures = [("base ppl", "base_perplexity"), ("global ppl", "global_perplexity"),
               ("personal ppl", "personalised_perplexity"), ("gain kept", "gain_kept")]
    figures += [(f"{k} {label}", f"{k}_{name}") for k in kinds
                for label, name in (("base ppl", "base_perplexity"), ("global ppl", "global_perplexity"),
                                    ("gain kept", "gain_kept"))]
    figures += [("eps median", "epsilon_median"), ("eps max", "epsilon_max"), ("user eps", "user_epsilon"),
                ("upload B", "upload_bytes"), ("wall s", "wall_seconds")]
    head = [*shown, *(label for label, _ in figures)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_fmt(r.get(k)) if not (k == "privacy.target-epsilon" and not r["privacy.enabled"]) else
                 ("user-level" if r.get("user-dp.enabled") else "no DP") for k in shown]
        cells += [_fmt(r.get(name), percent=name.endswith("gain_kept")) for _, name in figures]
        lines.append("| " + " | ".join(cells) + " |")
    note = ("\ngain kept: (base - this) / (base - best non-private) in held-out loss (nats), against the best "
            "non-private row on the same devices, rounds and seed; empty where the sweep has none.\n")
    return "\n".join(lines) + "\n" + note


def _fmt(value: Any, percent: bool = False) -> str:
    if value is None or value == "":
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if percent:
            return f"{100 * value:.0f}%"
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def method_of(r: dict[str, Any], grid: Grid) -> str:
    """A curve of the frontier: the swept keys other than the privacy budget and the seed."""
    keys = [k for k in grid.keys if k not in ("privacy.target-epsilon", "privacy.enabled", "user-dp.enabled")]
    return ", ".join(f"{k}={r.get(k)}" for k in keys) or "fedllm"


def frontier(grid: Grid, rows: list[dict[str, Any]], path: Path) -> None:
    """frontier.png: held-out perplexity of the global adapter against the target epsilon,
    one curve per method (mean over seeds), each non-private row a dashed reference line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves: dict[str, dict[float, list[float]]] = {}
    references: dict[str, list[float]] = {}
    for r in rows:
        ppl = r.get("global_perplexity")
        if ppl is None:
            continue
        if r["privacy.enabled"]:
            curves.setdefault(method_of(r, grid), {}).setdefault(float(r["privacy.target-epsilon"]), []).append(ppl)
        elif r.get("user-dp.enabled") and r.get("user_epsilon") is not None:  # at the user-level epsilon spent
            label = f"user-level: {method_of(r, grid)}"
            curves.setdefault(label, {}).setdefault(float(r["user_epsilon"]), []).append(ppl)
        elif not private(r):
            references.setdefault(method_of(r, grid), []).append(ppl)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (method, points) in enumerate(sorted(curves.items())):
        xs = sorted(points)
        ax.plot(xs, [statistics.fmean(points[x]) for x in xs], marker="o", color=colours[i % len(colours)],
                label=method)
    for i, (method, values) in enumerate(sorted(references.items())):
        ax.axhline(statistics.fmean(values), linestyle="--", color=colours[(len(curves) + i) % len(colours)],
                   label=f"no DP: {method}")
    base = [r["base_perplexity"] for r in rows if r.get("base_perplexity") is not None]
    if base:
        ax.axhline(statistics.fmean(base), linestyle=":", color="grey", label="base model")
    if curves:
        ax.set_xscale("log", base=2)
    ax.set(xlabel="epsilon (record-level: the target; user-level: spent)",
           ylabel="held-out perplexity (global adapter)", title="what privacy costs")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=100, format="png")
    plt.close(fig)
    atomic.write_bytes(path, buffer.getvalue())


# -- a tracking store ------------------------------------------------------------------------
def track(grid: Grid, rows: list[dict[str, Any]], folder: Path, how: str) -> int:
    """TensorBoard event files, one run per finished cell (per-round held-out perplexity and
    loss, train loss; the swept values as hparams, the final figures as metrics), so a
    sweep's runs compare in the tool researchers use. Written from the run directories, so
    a resumed sweep's are whole. `how`: auto (when the `tracking` extra is installed),
    tensorboard, or none. Returns how many were written."""
    if how == "none":
        return 0
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        if how == "tensorboard":
            raise ConfigError("--tracking tensorboard needs TensorBoard: pip install 'fedllm[tracking]'") from None
        return 0
    import shutil

    for r in rows:
        run_dir = Path(r["run_dir"])
        target = folder / run_dir.name
        shutil.rmtree(target, ignore_errors=True)  # rewritten whole: a resumed cell's events stay single
        writer = SummaryWriter(log_dir=str(target))
        for m in RunDir.existing(run_dir).metrics():
            step = int(m["round"])
            mean = _dict(_dict(m.get("evaluate")).get("mean"))
            for tag, key in (("heldout/perplexity", "perplexity"), ("heldout/loss", "loss")):
                if _num(mean.get(key)) is not None:
                    writer.add_scalar(tag, _num(mean[key]), step)
            reported = _dict(m.get("train")).get("train_loss")
            losses = [_num(v) for v in reported if _num(v) is not None] if isinstance(reported, list) else []
            if losses:
                writer.add_scalar("train/loss", statistics.fmean(losses), step)
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in r.items()
                   if k in (*grid.keys, "seed")}
        final = {f"final/{k}": r[k] for k in ("global_perplexity", "personalised_perplexity", "epsilon_median")
                 if r.get(k) is not None}
        writer.add_hparams(hparams, final, run_name=".")
        writer.close()
    return len(rows)
