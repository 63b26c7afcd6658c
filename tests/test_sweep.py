"""`fedllm sweep`: a 2x2 grid of real tiny simulations, its table, plot and tracking files;
rerun, crashed and resumed; bad grid files refused before anything runs."""

from __future__ import annotations

import csv
import json

import pytest

from conftest import TINY
from fedllm.errors import ConfigError

GRID = f"""
base = "{TINY}"
seeds = [0]
[set]
num-server-rounds = 1
"evaluate.num-clients" = 2
[grid]
"lora.freeze-a" = [true, false]
"privacy.enabled" = [true, false]
"""


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cache_dir):
    """The sweep killed after its first cell, then resumed: (grid file, out, cells run on resume)."""
    from fedllm.sweep import _simulate, load_grid, run_sweep

    folder = tmp_path_factory.mktemp("sweep")
    grid_file = folder / "grid.toml"
    grid_file.write_text(GRID)
    out = folder / "out"
    ran: list[str] = []

    def crash_after_one(config, run_dir):
        if ran:
            raise Crash("killed")
        ran.append(run_dir.name)
        _simulate(config, run_dir)

    with pytest.raises(Crash):
        run_sweep(load_grid(grid_file), out, run=crash_after_one, log=lambda _: None)
    resumed: list[str] = []

    def recording(config, run_dir):
        resumed.append(run_dir.name)
        _simulate(config, run_dir)

    run_sweep(load_grid(grid_file), out, run=recording, log=lambda _: None)
    return grid_file, out, ran, resumed


def test_a_killed_sweep_resumes_with_the_unfinished_cells_only(swept):
    _, out, ran, resumed = swept
    cells = sorted(p.name for p in (out / "runs").iterdir())
    assert len(cells) == 4 and len(ran) == 1
    assert sorted(ran + resumed) == cells and ran[0] not in resumed


def test_a_sweep_writes_every_row_to_the_csv_table_and_plot(swept):
    _, out, _, _ = swept
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert len(rows) == 4
    assert {(r["lora.freeze-a"], r["privacy.enabled"]) for r in rows} == {(a, b) for a in ("True", "False")
                                                                          for b in ("True", "False")}
    for r in rows:
        for column in ("base_perplexity", "global_perplexity", "verse_global_perplexity", "upload_bytes",
                       "wall_seconds", "seed"):
            assert r[column] != "", column
        summary = json.loads((out / "runs" / r["run_dir"].rsplit("/", 1)[-1] / "summary.json").read_text())
        assert float(r["global_perplexity"]) == pytest.approx(summary["global"]["perplexity"])
        assert (r["epsilon_median"] != "") == (r["privacy.enabled"] == "True")
        assert r["gain_kept"] != ""  # each row has the best non-private row of its population as reference
    best = min(float(r["global_loss"]) for r in rows if r["privacy.enabled"] == "False")
    for r in rows:
        expected = (float(r["base_loss"]) - float(r["global_loss"])) / (float(r["base_loss"]) - best)
        assert float(r["gain_kept"]) == pytest.approx(expected)
    table = (out / "sweep.md").read_text()
    assert table.count("\n| ") == 4 and "no DP" in table and "gain kept" in table
    assert (out / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_tracking_store_holds_each_cells_rounds(swept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _, _ = swept
    folders = sorted(p for p in (out / "tensorboard").iterdir())
    assert [p.name for p in folders] == sorted(p.name for p in (out / "runs").iterdir())
    events = EventAccumulator(str(folders[0]))
    events.Reload()
    assert [e.step for e in events.Scalars("heldout/perplexity")] == [0, 1]


def test_rerunning_a_finished_sweep_reruns_nothing(swept, capsys):
    from fedllm.cli import main

    grid_file, out, _, _ = swept
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    assert main(["sweep", "--config", str(grid_file), "--out", str(out)]) == 0
    assert "4 cells, 4 done, 0 to run" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")} == before


def test_cells_that_are_the_same_run_run_once(tmp_path):
    from fedllm.sweep import load_grid

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f'base = "{TINY}"\nseeds = [0, 1]\n[grid]\n"privacy.enabled" = [true, false]\n'
                         '"privacy.target-epsilon" = [2.0, 8.0]\n')
    cells = load_grid(grid_file).cells
    # privacy.* has no effect without DP: 2 budgets x 2 seeds, and one non-private run per seed
    assert len(cells) == 6 and sum(not c.config.privacy.enabled for c in cells) == 2
    assert len({c.name for c in cells}) == 6


@pytest.mark.parametrize("text, named", [
    ('[grid]\n"lora.rank" = [1, 2]\n', "lora.rank"),
    ('[grid]\n"lora.r" = []\n', "'lora.r' must be a non-empty list"),
    ('[grid]\n"lora.r" = [1, 0]\n', "lora.r"),
    ('[set]\n"privacy.target-epsilon" = "lots"\n', "privacy.target-epsilon"),
    ('[grid]\n"run-dir" = ["a"]\n', "run-dir"),
    ('seeds = []\n', "seeds"),
    ('grids = {}\n', "unknown field"),
    ('base = "nowhere.toml"\n', "nowhere.toml"),
    ('[grid\n', "not valid TOML"),
])
def test_a_bad_grid_file_is_refused_before_anything_runs(text, named, tmp_path, capsys):
    from fedllm.cli import main

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(text if text.startswith("base") else f'base = "{TINY}"\n{text}')
    with pytest.raises(ConfigError, match=named):
        from fedllm.sweep import load_grid

        load_grid(grid_file)
    assert main(["sweep", "--config", str(grid_file), "--out", str(tmp_path / "out")]) == 2
    assert named.split("'")[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_freeze_a_halves_the_upload_keeps_a_the_seeds_and_passes_the_audit(swept, tmp_path):
    """FFA-LoRA (lora.freeze-a): B alone travels, so the upload halves; A is the seed's in
    every checkpoint; the checkpoint is a plain PEFT adapter; the private run audits clean."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from fedllm.audit.records import audit_path

    _, out, _, _ = swept
    rows = {(r["lora.freeze-a"], r["privacy.enabled"]): r for r in csv.DictReader((out / "sweep.csv").open())}
    for private in ("True", "False"):
        assert float(rows["True", private]["upload_bytes"]) == float(rows["False", private]["upload_bytes"]) / 2
    frozen = out / "runs" / rows["True", "True"]["run_dir"].rsplit("/", 1)[-1]
    assert not audit_path(frozen).failures
    checkpoints = sorted((frozen / "checkpoints").glob("round-*"))
    first, last = (load_file(c / "adapter_model.safetensors") for c in (checkpoints[0], checkpoints[-1]))
    a_keys = [k for k in first if "lora_A" in k]
    assert a_keys and all(torch.equal(first[k], last[k]) for k in a_keys)  # A never moved
    assert any(not torch.equal(first[k], last[k]) for k in first if "lora_B" in k)  # B learned
    summary = json.loads((frozen / "summary.json").read_text())
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(summary["base_model"]), checkpoints[-1])
    assert sum(1 for n, _ in model.named_parameters() if "lora_A" in n) == len(a_keys)


def test_variants_sweep_named_sets_of_keys_together(tmp_path):
    from fedllm.sweep import load_grid

    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f'base = "{TINY}"\n[grid]\n"privacy.target-epsilon" = [2.0, 8.0]\n'
                         '[variants.plain]\n[variants.levers]\n"lora.r" = 1\n"lora.freeze-a" = true\n'
                         '[variants.user]\n"privacy.enabled" = false\n"user-dp.enabled" = true\n')
    grid = load_grid(grid_file)
    assert grid.keys == ["privacy.target-epsilon", "variant"]
    by = {(c.values["variant"], c.values["privacy.target-epsilon"]): c.config for c in grid.cells}
    assert by["levers", 2.0].lora.r == 1 and by["levers", 2.0].lora.freeze_a and by["plain", 8.0].lora.r == 2
    # user-level DP alone: the record-level budget has no effect there, so one run, not two
    assert sum(1 for v, _ in by if v == "user") == 1 and len(grid.cells) == 5
    grid_file.write_text(f'base = "{TINY}"\n[variants.bad]\n"lora.r" = 0\n')
    with pytest.raises(ConfigError, match="lora.r"):
        load_grid(grid_file)


def test_every_shipped_experiment_and_grid_file_is_a_valid_config():
    """The files the README and docs name: a key renamed under them fails here, not an hour into a sweep."""
    from fedllm.simulate import experiment_path, load_experiment
    from fedllm.sweep import load_grid

    folder = experiment_path().parent
    grids = [p for p in sorted(folder.glob("*.toml")) if "[config]" not in p.read_text()]
    for experiment in sorted(set(folder.glob("*.toml")) - set(grids)):
        load_experiment(experiment, {})
    assert grids, "no grid file shipped"
    for grid_file in grids:
        assert load_grid(grid_file).cells, grid_file
