"""``segprop report`` from synthetic manifests: one segprop run compared with an lw and an e2e run."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import fsspec
import matplotlib.image
import pytest

from segprop_ray.reporting.plots import write_plots
from segprop_ray.reporting.report import ROW_COLUMNS, build_report, reference_rows, write_report
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import LayerRecord, Manifest, ManifestStore, ModelInfo

NUM_LAYERS = 8
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BASELINE = {"eval_loss": 3.91, "perplexity": math.exp(3.91), "accuracy": 0.25}


def history(final_loss: float, steps: int = 40) -> list[dict[str, float]]:
    """Logged records of one iteration: train loss every 5 steps falling to ``final_loss``, eval every 20."""
    records = []
    for step in range(5, steps + 1, 5):
        record = {"step": step, "train_loss": final_loss + 1.5 * math.exp(-step / 10), "lr": 3e-3 * (1 - step / (steps + 1))}
        if step % 20 == 0:
            record["eval_loss"] = final_loss + 0.05 + math.exp(-step / 10)
        records.append(record)
    return records


def layer_record(depth: int, stage: str, eval_loss: float, accuracy: float | None, nhsic: tuple[float, float] | None,
                 wall_s: float = 42.0, peak_memory: int = 900 << 20) -> LayerRecord:
    """A committed iteration with realistic numbers."""
    metrics = {"tokens": 40 * 16 * 64, "wall_s": wall_s, "tokens_per_s": 40 * 16 * 64 / wall_s,
               "peak_memory_bytes": peak_memory, "data_wait_share": 0.031 * (depth % 3 + 1), "resumed_from_step": None}
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    if nhsic is not None:
        metrics["nhsic_input"], metrics["nhsic_label"] = nhsic
    decision = {"reason": "max_steps", "step": 40, "eval_loss": eval_loss, "best_eval_loss": eval_loss,
                "detail": f"step budget reached: 40/40 steps (max_steps) at depth {depth}"}
    return LayerRecord(depth=depth, stage=stage, status="done", steps=40, train_loss=eval_loss - 0.07,
                       eval_loss=eval_loss, perplexity=math.exp(eval_loss), decision=decision,
                       history=history(eval_loss), metrics=metrics)


def global_decision(depth: int, losses: dict[int, float], last: int) -> dict:
    best = min((d for d in losses if d <= depth), key=losses.get)
    go_on = depth < last
    return {"depth": depth, "continue_training": go_on, "reason": "continue" if go_on else "last_layer",
            "detail": f"exit {depth} eval loss {losses[depth]:.4f}; best {losses[best]:.4f} at exit {best}" if go_on
            else f"layer {depth} is the last middle layer", "eval_loss": losses[depth], "best_depth": best,
            "best_eval_loss": losses[best]}


def manifest_of(mode: str, base_depth: int, last_layers: int, losses: dict[int, float], accuracy: dict[int, float],
                nhsic: dict[int, tuple[float, float]], baseline: dict | None = None) -> Manifest:
    """A finished run of ``mode`` with one record per depth of ``losses``."""
    model = ModelInfo(uri="/models/tiny-llama-8", architecture="LlamaForCausalLM", family="llama",
                      num_layers=NUM_LAYERS, hidden_size=64, vocab_size=80, tied_embeddings=False)
    depths, last = sorted(losses), max(losses)
    stage = {True: "e2e" if mode == "e2e" else "stage1", False: "stage2"}
    layers = {str(d): layer_record(d, stage[d == base_depth], losses[d], accuracy.get(d), nhsic.get(d),
                                   wall_s={"segprop": 40.0, "lw": 31.0}.get(mode, 260.0) + d,
                                   peak_memory={"segprop": 700, "lw": 520}.get(mode, 1500) << 20) for d in depths}
    decisions = [global_decision(d, losses, last) for d in depths] if mode != "e2e" else []
    extra = {"baseline": baseline} if baseline is not None else {}
    return Manifest(run_id=f"{mode}-run", config_hash="0" * 64, mode=mode, base_depth=base_depth, state="done",
                    last_layers=last_layers, model=model, group_size=4, layers=layers, decisions=decisions,
                    final_depth=last, tokens={"train": {"num_blocks": 2800}, "eval": {"num_blocks": 180}}, **extra)


def segprop_manifest() -> Manifest:
    losses = {2: 2.31, 3: 2.05, 4: 1.97, 5: 1.93}
    accuracy = {2: 0.41, 3: 0.55, 4: 0.61, 5: 0.63}
    nhsic = {2: (0.71, 0.38), 3: (0.66, 0.45), 4: (0.61, 0.52), 5: (0.58, 0.57)}
    return manifest_of("segprop", 2, 2, losses, accuracy, nhsic, BASELINE)


def lw_manifest() -> Manifest:
    losses = {2: 2.62, 3: 2.71, 4: 2.85, 5: 2.97, 6: 3.04, 7: 3.12}
    accuracy = {2: 0.33, 3: 0.31, 4: 0.30, 5: 0.29, 6: 0.27, 7: 0.27}
    nhsic = {2: (0.70, 0.31), 3: (0.52, 0.27), 4: (0.38, 0.22), 5: (0.29, 0.19), 6: (0.21, 0.16), 7: (0.17, 0.15)}
    return manifest_of("lw", 2, 0, losses, accuracy, nhsic)


def e2e_manifest() -> Manifest:
    return manifest_of("e2e", NUM_LAYERS - 1, 0, {NUM_LAYERS - 1: 1.95}, {NUM_LAYERS - 1: 0.60},
                       {NUM_LAYERS - 1: (0.64, 0.55)})


def write_run(uri: str, manifest: Manifest) -> str:
    ManifestStore(RunLayout.open(uri)).write(manifest)
    return uri


def section(markdown: str, title: str) -> str:
    return markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def table_rows(block: str) -> list[list[str]]:
    lines = [line for line in block.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]


def table_headings(block: str) -> list[str]:
    line = next(line for line in block.splitlines() if line.startswith("|"))
    return [cell.strip() for cell in line.strip("|").split(" | ")]


def assert_real_png(data: bytes) -> None:
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    assert image.shape[1] > 300 and image.shape[0] > 200 and image.std() > 0.01  # not a blank canvas


@pytest.fixture
def runs(tmp_path) -> dict[str, str]:
    return {"segprop": write_run(str(tmp_path / "segprop"), segprop_manifest()),
            "lw": write_run(str(tmp_path / "lw"), lw_manifest()),
            "e2e": write_run((tmp_path / "e2e").as_uri(), e2e_manifest())}


def test_report_files_table_json_csv_and_plots_agree_with_the_manifest(runs, tmp_path):
    manifest = segprop_manifest()
    written = write_report(runs["segprop"], compare=[runs["lw"], runs["e2e"]])

    report_dir = tmp_path / "segprop" / "report"
    assert set(written) == {"report.md", "report.json", "report.csv", "metric_vs_depth.png", "loss_curves.png",
                            "nhsic.png", "efficiency.png", "time_per_stage.png"}
    assert all(Path(path).parent == report_dir and Path(path).is_file() for path in written.values())
    depths = manifest.committed_depths()
    markdown = (report_dir / "report.md").read_text()
    rows = table_rows(section(markdown, "Results per depth"))
    assert [int(row[0]) for row in rows] == depths  # one row per depth
    report = json.loads((report_dir / "report.json").read_text())
    csv_rows = list(csv.DictReader(io.StringIO((report_dir / "report.csv").read_text())))
    assert list(csv_rows[0]) == ROW_COLUMNS and len(csv_rows) == len(report["layers"]) == len(depths)
    for depth, from_json, from_csv in zip(depths, report["layers"], csv_rows):
        record = manifest.layer(depth)
        expected = {"depth": depth, "eval_loss": record.eval_loss, "train_loss": record.train_loss,
                    "perplexity": record.perplexity, "accuracy": record.metrics["accuracy"],
                    "tokens": record.metrics["tokens"], "nhsic_label": record.metrics["nhsic_label"],
                    "peak_memory_bytes": record.metrics["peak_memory_bytes"], "wall_s": record.metrics["wall_s"]}
        assert {key: from_json[key] for key in expected} == expected
        assert {key: float(from_csv[key]) for key in expected} == pytest.approx(expected, rel=1e-15)
        assert from_json["global_exit"] == from_csv["global_exit"] == ("last_layer" if depth == 5 else "continue")
        assert from_json["iteration_exit"] == from_csv["iteration_exit"] == "max_steps"
    for name in ("metric_vs_depth.png", "loss_curves.png", "nhsic.png", "efficiency.png"):
        assert_real_png((report_dir / name).read_bytes())
        assert f"]({name})" in markdown


def test_report_shows_the_decision_trace_references_and_comparison(runs, tmp_path):
    write_report(runs["segprop"], out=str(tmp_path / "out"), compare=[runs["lw"], runs["e2e"]])
    markdown = (tmp_path / "out" / "report.md").read_text()
    report = json.loads((tmp_path / "out" / "report.json").read_text())

    trace = table_rows(section(markdown, "Global exit decisions"))
    assert [(row[0], row[1], row[2]) for row in trace] == [("2", "continue", "continue"), ("3", "continue", "continue"),
                                                           ("4", "continue", "continue"), ("5", "stop", "last_layer")]
    for decision in segprop_manifest().decisions:
        assert decision["detail"] in markdown
    assert report["decisions"] == segprop_manifest().decisions
    assert "step budget reached: 40/40 steps (max_steps) at depth 4" in section(markdown, "Iteration exits")

    e2e = next(ref for ref in report["references"] if ref["label"] == "e2e")
    assert (e2e["depth"], e2e["eval_loss"], e2e["accuracy"]) == (NUM_LAYERS - 1, 1.95, 0.60)
    assert ["e2e", "e2e-run", "7", "1.9500", "7.0287", "60.0%"] in table_rows(section(markdown, "Reference scores"))
    comparison = table_rows(section(markdown, "Comparison by depth"))
    assert [row[0] for row in comparison] == ["2", "3", "4", "5", "6", "7"]  # the union of segprop's and lw's depths
    assert comparison[-1][1:3] == ["-", "3.1200"]  # segprop has no exit 7; lw does


def test_original_model_score_is_a_reference_row():
    manifest = Manifest(**{**segprop_manifest().model_dump(), "baseline": BASELINE})
    references = reference_rows(manifest, [e2e_manifest()])
    assert [ref["label"] for ref in references] == ["original model", "e2e"]
    assert {key: references[0][key] for key in BASELINE} == BASELINE
    assert reference_rows(e2e_manifest(), []) == []  # no baseline, nothing compared


def test_original_model_score_read_from_the_manifest_file(runs, tmp_path):
    write_report(runs["segprop"], out=str(tmp_path / "out"))
    assert "| original model | segprop-run | - | 3.9100 |" in (tmp_path / "out" / "report.md").read_text()


def test_report_to_an_fsspec_uri_and_from_a_remote_run():
    memory = fsspec.filesystem("memory")
    run = write_run("memory://runs/segprop", segprop_manifest())
    written = write_report(run, compare=[write_run("memory://runs/e2e", e2e_manifest())])
    assert written["report.md"] == "memory:///runs/segprop/report/report.md"
    assert_real_png(memory.cat_file("/runs/segprop/report/metric_vs_depth.png"))
    assert json.loads(memory.cat_file("/runs/segprop/report/report.json"))["run"]["run_id"] == "segprop-run"
    written = write_report(run, out="memory://elsewhere/report")
    assert set(memory.ls("/elsewhere/report", detail=False)) == {f"/elsewhere/report/{name}" for name in written}


def test_plots_without_data_are_left_out(tmp_path):
    bare = manifest_of("segprop", 2, 2, {2: 2.3, 3: 2.1}, accuracy={}, nhsic={})
    for record in bare.layers.values():
        record.metrics, record.history = {}, []
    assert write_plots(tmp_path, build_report(bare, "/runs/bare")) == {"Score by depth": "metric_vs_depth.png"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metric_vs_depth.png"]


def test_a_failed_exit_evaluation_is_shown(tmp_path):
    manifest = segprop_manifest()
    manifest.layer(3).metrics = {**manifest.layer(3).metrics, "evaluation_error": "OutOfMemoryError: CUDA out of memory"}
    del manifest.layer(3).metrics["accuracy"]
    write_report(write_run(str(tmp_path / "run"), manifest))
    markdown = (tmp_path / "run" / "report" / "report.md").read_text()
    assert "- exit 3: evaluation failed: OutOfMemoryError: CUDA out of memory" in markdown
    block = section(markdown, "Results per depth")
    assert table_rows(block)[1][table_headings(block).index("accuracy")] == "-"  # no accuracy at depth 3


def test_stage_totals_sum_layers_and_snapshot_jobs(tmp_path):
    """Stage 2's row sums its layers over training time; the snapshot row sums rows, bytes and wall time."""
    from segprop_ray.reporting.stages import stage_rows
    from segprop_ray.storage.manifest import StepRecord

    manifest = segprop_manifest()
    for depth, record in manifest.layers.items():
        record.metrics.update(wall_s=10.0 + int(depth), eval_s=2.0, data_wait_s=0.08, tokens=4000,
                              driver_wall_s=15.0 + int(depth), peak_memory_bytes=(600 + int(depth)) << 20)
    manifest.tokens = {"train": {"num_blocks": 2800, "seq_len": 64}, "eval": {"num_blocks": 180, "seq_len": 64}}
    manifest.steps = {
        "tokenize": StepRecord(status="done", wall_s=12.5),
        "snapshot:2": StepRecord(status="done", wall_s=20.0, outputs={"rows": {"train": 2800, "eval": 180}, "bytes": 4_000_000}),
        "snapshot:3": StepRecord(status="done", wall_s=30.0, outputs={"rows": {"train": 2800, "eval": 180}, "bytes": 6_000_000}),
        "snapshot:4": StepRecord(status="running", outputs={"files_done": {"train": 1}}),
        "export:5": StepRecord(status="done", wall_s=3.0),
    }
    manifest.layers["3"].metrics["world_size"] = 2  # its rank 0 saw half of the layer's tokens
    rows = {row["stage"]: row for row in stage_rows(manifest)}
    assert list(rows) == ["tokenize", "stage1", "snapshot", "stage2", "export"]
    assert rows["tokenize"]["tokens"] == 2980 * 64 and rows["tokenize"]["tokens_per_s"] == round(2980 * 64 / 12.5, 1)
    stage2 = rows["stage2"]
    assert stage2["items"] == 3 and stage2["tokens"] == 16000 and stage2["wall_s"] == 15 * 3 + 3 + 4 + 5
    train_s = (13 - 2) + (14 - 2) + (15 - 2)
    assert stage2["tokens_per_s"] == stage2["training_tokens_per_s"] == round(16000 / train_s, 1)
    assert stage2["tokens_per_wall_s"] == round(16000 / stage2["wall_s"], 1)  # over the driver's wall time
    assert rows["tokenize"]["tokens_per_wall_s"] == rows["tokenize"]["tokens_per_s"]
    assert rows["tokenize"]["training_tokens_per_s"] is None
    assert stage2["data_wait_share"] == round(0.24 / train_s, 4) and stage2["peak_memory_bytes"] == 605 << 20
    snapshot = rows["snapshot"]
    assert snapshot["items"] == 2 and snapshot["wall_s"] == 50.0 and snapshot["tokens"] == 2 * 2980 * 64
    assert snapshot["written_mb_per_s"] == 0.2 and snapshot["bytes_written"] == 10_000_000

    ManifestStore(RunLayout.open(str(tmp_path / "run"))).write(manifest)
    files = write_report(str(tmp_path / "run"), out=str(tmp_path / "report"))
    markdown = Path(files["report.md"]).read_text()
    table = table_rows(section(markdown, "Time per stage"))
    column = table_headings(section(markdown, "Time per stage")).index
    assert [row[0] for row in table] == ["tokenize", "stage1", "snapshot", "stage2", "export"]
    assert table[3][column("training tokens/s")] == f"{16000 / train_s:,.1f}" and table[2][column("write MB/s")] == "0.2"
    assert table[3][column("tokens/s")] == f"{16000 / stage2['wall_s']:,.1f}" and table[3][column("wall s")] == "57.0"
    assert json.loads(Path(files["report.json"]).read_text())["stages"][3]["tokens"] == 16000
    assert_real_png(Path(files["time_per_stage.png"]).read_bytes())

    from rich.console import Console
    from segprop_ray.reporting.status import render_status
    console = Console(record=True, width=200)
    render_status(manifest, console)
    assert "time per stage: tokenize 12 s, stage1 17 s, snapshot 50 s (2), stage2 57 s (3), export 3.0 s" in console.export_text()
    assert "![Time per stage](time_per_stage.png)" in markdown


def test_per_depth_wall_time_is_the_drivers_and_train_time_the_loops(tmp_path):
    """"wall s" is the driver's time for the iteration (the loop's where an old manifest lacks it), "train s" the loop's."""
    from rich.console import Console
    from segprop_ray.reporting.status import render_status, status_json

    manifest = segprop_manifest()
    for depth in (2, 3, 4):  # depth 5 stands for a manifest from before driver_wall_s was recorded
        manifest.layer(depth).metrics["driver_wall_s"] = 50.0 + depth
    files = write_report(write_run(str(tmp_path / "run"), manifest), out=str(tmp_path / "report"))
    block = section(Path(files["report.md"]).read_text(), "Results per depth")
    column = table_headings(block).index
    cells = [(row[column("wall s")], row[column("train s")]) for row in table_rows(block)]
    assert cells == [("52.0", "42.0"), ("53.0", "43.0"), ("54.0", "44.0"), ("45.0", "45.0")]
    layers = json.loads(Path(files["report.json"]).read_text())["layers"]
    assert [(row["wall_s"], row["driver_wall_s"]) for row in layers] == [(42.0, 52.0), (43.0, 53.0), (44.0, 54.0),
                                                                        (45.0, None)]
    assert [row["driver_wall_s"] for row in json.loads(status_json(manifest))["layers"]] == [52.0, 53.0, 54.0, None]

    console = Console(record=True, width=250)
    render_status(manifest, console)
    table = [[cell.strip() for cell in line.strip("┃│").split(line[0])] for line in console.export_text().splitlines()
             if line[:1] in ("┃", "│")]
    status_column = table[0].index
    assert [(row[status_column("wall s")], row[status_column("train s")]) for row in table[1:]] == cells
    assert [row[status_column("train tok/s")] for row in table[1:]] == [f"{40 * 16 * 64 / (40 + d):.0f}" for d in (2, 3, 4, 5)]


def test_truncated_and_dropped_examples_are_shown_by_status_and_report(tmp_path, capsys):
    """Examples longer than seq_len counted by the packers of a tokenization reach ``segprop status`` (text and JSON)
    and the report: N truncated to seq_len, M dropped."""
    from helpers import run_cli
    from segprop_ray.config.schema import DataConfig
    from segprop_ray.core.blocks import CONTEXT, TARGET
    from segprop_ray.core.packing import Example
    from segprop_ray.pipeline.token_packing import Tokenization
    from segprop_ray.storage.shard_format import ShardSpec
    from segprop_ray.storage.tokenize_state import TokenizeState

    def example(context: int, target: int) -> Example:
        return Example(list(range(3, 3 + context + target)), [CONTEXT] * context + [TARGET] * target)

    docs = {"train.jsonl": [example(3, 3)] * 6 + [example(4, 8)] * 3 + [example(10, 2)],  # 4 too long, 1 of them
            "eval.jsonl": [example(2, 3), example(5, 9), example(3, 2)]}                 # with no target left
    inputs = {"train": ["train.jsonl"], "eval": ["eval.jsonl"]}
    data = DataConfig(train="train.jsonl", eval="eval.jsonl", seq_len=8, format="prompt_completion")
    state = TokenizeState("tokens-hash", inputs)
    layout = RunLayout.open(str(tmp_path / "tokens-run"))
    Tokenization(layout, data, ShardSpec(seq_len=8, group_size=2, groups_per_file=2), state, pad_id=1).run(
        lambda files, start: ((0, e) for e in docs[files[0]]))
    examples = {stream: counts.to_dict() for stream, counts in state.stats.items()}
    assert examples == {"train": {"examples": 10, "truncated": 4, "dropped": 1},
                        "eval": {"examples": 3, "truncated": 1, "dropped": 0}}

    manifest = segprop_manifest()
    manifest.examples = examples
    run_dir = write_run(str(tmp_path / "run"), manifest)
    expected = ("train: 10 examples, 4 truncated to seq_len, 1 dropped (no target token left); "
                "eval: 3 examples, 1 truncated to seq_len, 0 dropped (no target token left)")
    code, out, _ = run_cli(capsys, "status", run_dir)
    assert code == 0 and f"data: {expected}" in " ".join(out.split())
    code, out, _ = run_cli(capsys, "status", run_dir, "--json")
    assert code == 0 and json.loads(out)["examples"] == examples
    files = write_report(run_dir, out=str(tmp_path / "report"))
    assert f"- **examples**: {expected}\n" in Path(files["report.md"]).read_text()
    assert json.loads(Path(files["report.json"]).read_text())["run"]["examples"] == examples
