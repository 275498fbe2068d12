"""``segprop demo``, the README's main job (``make run``), end to end: the installed entry point in a process of its
own, on the embedded default config with a smaller step budget (``--set`` overrides, the same code path). What a
user gets is checked: the per-layer table it prints, the report files, and an exported model that loads with
transformers and holds exactly the committed weights.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ray_cluster import child_environment, end_session
from segprop_ray.core.weights import load_tensors
from segprop_ray.demo.run import DEMO_CONFIG
from segprop_ray.reporting.export import open_run

pytestmark = pytest.mark.slow
STEP_BUDGET = ("stage1.max_steps=4", "training.max_steps=4", "training.eval_steps=2", "training.save_steps=2")
"""4 steps per iteration instead of 120 and 40, an evaluation and a checkpoint every 2."""
DEPTHS, FINAL = [2, 3, 4, 5], 5  # the demo's 8 layers with p = 2, r = 2: Stage 1 commits 2, Stage 2 layers 3..5
REPORT_FILES = ("report.md", "report.json", "report.csv", "metric_vs_depth.png", "loss_curves.png", "nhsic.png",
                "efficiency.png", "time_per_stage.png")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, str]:
    """(output directory, console output) of ``segprop demo --out OUT`` with the smaller step budget."""
    root = tmp_path_factory.mktemp("demo")
    out, home = root / "out", root / "home"  # HOME: the token Ray creates for the local cluster goes there
    home.mkdir()
    command = [str(Path(sys.executable).parent / "segprop"), "demo", "--out", str(out)]
    command += [arg for override in STEP_BUDGET for arg in ("--set", override)]
    # Ray Train's controller polls the workers every 0.25 s instead of 2 s: each checkpoint report waits for a poll.
    env = child_environment(home, PYTHONIOENCODING="utf-8", RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.25")
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=600)
    finally:
        end_session(proc)  # its local Ray and anything else it started
    assert proc.returncode == 0, output[-4000:]
    return out, output


def table_rows(output: str) -> list[list[str]]:
    """The cells of the per-layer table's body rows, as printed."""
    return [[cell.strip() for cell in line.strip().strip("│").split("│")] for line in output.splitlines()
            if line.startswith("│")]


def test_demo_runs_the_embedded_default(demo):
    out, output = demo
    assert f"demo config: {out}/config.yaml" in output
    assert (out / "config.yaml").read_text() == DEMO_CONFIG.format(out=out)
    _, manifest = open_run(str(out / "run"))
    assert manifest.state == "done" and manifest.committed_depths() == DEPTHS and manifest.final_depth == FINAL
    assert all(manifest.layer(depth).steps == 4 for depth in DEPTHS)


def test_demo_prints_the_per_layer_table(demo):
    out, output = demo
    _, manifest = open_run(str(out / "run"))
    header = [line for line in output.splitlines() if line.startswith(f"{manifest.run_id}  state: done")]
    assert len(header) == 1 and "mode: segprop" in header[0] and "(8 layers)  p=2 r=2" in header[0]
    rows = table_rows(output)
    assert [row[:4] for row in rows] == [[str(d), "stage1" if d == 2 else "stage2", "done", "4"] for d in DEPTHS]
    assert [row[5] for row in rows] == [f"{manifest.layer(d).eval_loss:.4f}" for d in DEPTHS]
    assert rows[-1][8] == "max_steps / last_layer" and all(row[8] == "max_steps / continue" for row in rows[:-1])
    assert f"final model: exit {FINAL}" in output
    assert f"report: {out}/run/report/report.md" in output
    assert f"final model (Hugging Face format): {out}/run/export/exit-{FINAL}" in output


def test_demo_writes_the_report(demo):
    out, _ = demo
    report = out / "run" / "report"
    _, manifest = open_run(str(out / "run"))
    assert sorted(p.name for p in report.iterdir()) == sorted(REPORT_FILES)
    assert all((report / name).stat().st_size > 10_000 for name in REPORT_FILES if name.endswith(".png"))
    layers = json.loads((report / "report.json").read_text())["layers"]
    assert [(row["depth"], row["eval_loss"]) for row in layers] == [(d, manifest.layer(d).eval_loss) for d in DEPTHS]
    text = (report / "report.md").read_text()
    for depth in DEPTHS:
        assert f"\n| {depth} | {'stage1' if depth == 2 else 'stage2'} | " in text
    assert len((report / "report.csv").read_text().splitlines()) == 1 + len(DEPTHS)


def test_demo_exports_a_loadable_model_of_the_committed_weights(demo):
    out, _ = demo
    run, export = out / "run", out / "run" / "export" / f"exit-{FINAL}"
    model = AutoModelForCausalLM.from_pretrained(export).eval()
    assert model.config.num_hidden_layers == 8  # layers 0..5 + LL (6, 7)
    committed = {}
    for path in sorted(run.glob("layers/*.safetensors")) + [run / "exits" / f"exit-{FINAL}" / "ll.safetensors"]:
        committed.update(load_tensors(path))
    state = model.state_dict()
    assert sorted(state) == sorted(committed)
    assert all(torch.equal(state[name], tensor) for name, tensor in committed.items())
    tokenizer = AutoTokenizer.from_pretrained(export)
    ids = tokenizer("the cat sat on the", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert generated.shape == (1, ids.shape[1] + 4) and torch.equal(generated[:, : ids.shape[1]], ids)
    assert (export / "README.md").is_file()
