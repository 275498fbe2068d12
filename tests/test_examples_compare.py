"""examples/compare/run_compare.py before any run: --modes is checked, the e2e budget matches the segprop
run's whether the config counts optimizer steps or (max_steps: -1) passes over the data, and the
``segprop compare`` command it runs resolves to one run directory per mode with that budget."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from segprop_ray.config import validate_config

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "compare" / "run_compare.py"


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("run_compare", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def config(training: dict, stage1: dict | None = None):
    raw = {"run_dir": "/tmp/r", "model": "m", "data": {"train": "t.jsonl"}, "training": training,
           "segprop": {"mode": "segprop", "base_depth": 2, "last_layers": 2}}
    return validate_config({**raw, "stage1": stage1} if stage1 else raw)


def test_unknown_mode_is_one_line_before_any_work(compare, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--modes 'segprop,foo': unknown mode foo; allowed: segprop, lw, e2e$"):
        compare.main(["--modes", "segprop,foo", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert compare.parse_modes(" lw ,e2e") == ["lw", "e2e"]
    with pytest.raises(SystemExit, match="no mode given"):
        compare.parse_modes(",")


def test_e2e_budget_in_steps_or_epochs(compare):
    # 8 layers, p = 2, r = 2: Stage 1, then the 3 middle layers 3, 4, 5
    assert compare.budget_for(config({"max_steps": 80}, {"max_steps": 240}), 8) == {"max_steps": 240 + 3 * 80}
    epochs = compare.budget_for(config({"num_train_epochs": 2.0}, {"num_train_epochs": 4.0}), 8)
    assert epochs == {"max_steps": -1, "num_train_epochs": 4.0 + 3 * 2.0}
    assert compare.run_spec("e2e", epochs) == "e2e:training.max_steps=-1,training.num_train_epochs=10.0"
    assert compare.run_spec("lw", epochs) == "lw"
    with pytest.raises(SystemExit, match="both positive or both -1"):
        compare.budget_for(config({"max_steps": -1}, {"max_steps": 240}), 8)


def test_the_example_is_segprop_compare_with_a_run_per_mode(compare, tmp_path):
    from segprop_ray.config.compare import load_compare

    budget = {"max_steps": 480}
    args = compare.compare_args(tmp_path / "c.yaml", tmp_path / "out", ["segprop", "lw", "e2e"], ["training.seed=3"],
                                budget)
    assert args == ["compare", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "out"), "--runs", "segprop",
                    "--runs", "lw", "--runs", "e2e:training.max_steps=480", "--set", "training.seed=3"]
    config = tmp_path / "c.yaml"
    config.write_text("run_dir: unused\nmodel: m\ndata: {train: t.jsonl}\nsegprop: {base_depth: 2, last_layers: 2}\n")
    runs = load_compare(config, args[5::2][:3], str(tmp_path / "out"), ["training.seed=3"]).runs
    assert [(run.cfg.run_dir, run.cfg.segprop.mode, run.cfg.training.max_steps, run.cfg.training.seed) for run in runs] == [
        (str(tmp_path / "out/runs/segprop"), "segprop", -1, 3), (str(tmp_path / "out/runs/lw"), "lw", -1, 3),
        (str(tmp_path / "out/runs/e2e"), "e2e", 480, 3)]
