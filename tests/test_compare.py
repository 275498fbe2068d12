"""``segprop compare``: run specs, bad input refused before any run, the Table-1 report, and (slow, real Ray) a set
that is interrupted and continued without retraining its finished runs."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import pytest
import yaml

from helpers import one_line_error, run_cli
from pipeline_setup import NUM_LAYERS, make_inputs, pipeline_config, write_config
from segprop_ray.config import ConfigError
from segprop_ray.config.compare import load_compare, parse_run
from segprop_ray.demo.corpus import generate_mc_items, write_mc_jsonl
from segprop_ray.pipeline.driver import Driver
from segprop_ray.reporting.compare_report import write_compare_report
from segprop_ray.reporting.report_text import fmt
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import LayerRecord, Manifest, ManifestStore, ModelInfo

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    model, train, evaluation = make_inputs(root)
    mc = write_mc_jsonl(generate_mc_items(8, seed=2), root / "data" / "mc.jsonl")
    return model, train, evaluation, mc


def base_config(tmp_path: Path, inputs, **sections) -> Path:
    """The run config every run of a test's set starts from (its run_dir is replaced per run)."""
    model, train, evaluation, mc = inputs
    evaluation_section = {"mc_path": str(mc), "max_items": 4, "prompt_style": "cloze", "nhsic_tokens": 0}
    raw = pipeline_config("unused", str(model), str(train), str(evaluation), evaluation=evaluation_section,
                          resources={"num_cpus": 2}, **sections)
    return write_config(tmp_path / "run.yaml", raw)


# -- run specs --------------------------------------------------------------------------------------
def test_run_specs_in_text_and_in_a_spec_file(tmp_path, inputs):
    deep = parse_run("segprop:p=18,ll=4,training.learning_rate=1e-4,data.train=[a.jsonl,b.jsonl],name=deep")
    assert (deep.mode, deep.p, deep.ll, deep.name) == ("segprop", 18, 4, "deep")
    assert deep.set == ["training.learning_rate=1e-4", "data.train=[a.jsonl,b.jsonl]"]  # a comma inside a value stays
    names = [parse_run(t).default_name() for t in ("segprop:p=1", "segprop:ll=0,p=2", "lora:lora_r=16", "e2e")]
    assert names == ["segprop-p1", "segprop-p2-ll0", "lora-lora_r16", "e2e"]
    base_config(tmp_path, inputs)
    spec = tmp_path / "set.yaml"
    spec.write_text(yaml.safe_dump({"config": "run.yaml", "out": "cmp", "set": ["training.max_steps=3"],
                                    "runs": ["segprop:p=0", {"mode": "lw", "p": 1, "name": "layerwise",
                                                             "set": ["training.learning_rate=0.01"]}, "e2e"]}))
    compare = load_compare(spec, overrides=["training.seed=7"])
    assert compare.out == str(tmp_path / "cmp")  # relative to the spec file, like its config
    runs = {run.name: run.cfg for run in compare.runs}
    assert list(runs) == ["segprop-p0", "layerwise", "e2e"]
    assert {name: (cfg.run_dir, cfg.segprop.mode, cfg.segprop.base_depth) for name, cfg in runs.items()} == {
        "segprop-p0": (str(tmp_path / "cmp/runs/segprop-p0"), "segprop", 0),
        "layerwise": (str(tmp_path / "cmp/runs/layerwise"), "lw", 1),
        "e2e": (str(tmp_path / "cmp/runs/e2e"), "e2e", 0)}
    assert [(cfg.training.max_steps, cfg.training.seed, cfg.training.learning_rate) for cfg in runs.values()] == [
        (3, 7, 3e-3), (3, 7, 0.01), (3, 7, 3e-3)]
    assert [cfg.evaluation.baseline for cfg in runs.values()] == [True, False, False]  # the input model scored once
    cli_runs = load_compare(spec, runs=["lw:p=2"], out=str(tmp_path / "other"))  # --runs / --out replace the spec's
    assert [(run.name, run.cfg.run_dir) for run in cli_runs.runs] == [("lw-p2", str(tmp_path / "other/runs/lw-p2"))]


BAD_SETS = [
    (["--runs", "lora:r=16"], "run 'lora:r=16': key 'r' is ambiguous: write ll=N for the last layers "
                              "(segprop.last_layers, the paper's r) or lora_r=N for the LoRA rank (segprop.adapter.r)"),
    (["--runs", "e2e:p=0"], "run 'e2e:p=0': p=0 (segprop.base_depth) does nothing in mode e2e; leave it out"),
    (["--runs", "lw:p=1,ll=2"], "run 'lw:p=1,ll=2': ll=2 (segprop.last_layers) does nothing in mode lw; leave it out"),
    (["--runs", "lora:segprop.base_depth=1"], "run 'lora': config: segprop: base_depth = 1 does nothing in "
                                              "mode lora"),
    (["--runs", "e2e:lora_r=4"], "run 'e2e-lora_r4': config: segprop: adapter with mode e2e: use mode lora"),
    (["--runs", "segprop:p=0", "--runs", "foo:p=1"], "run 'foo-p1': config: segprop.mode: Input should be 'segprop', "
                                                     "'lw', 'e2e' or 'lora' (got 'foo')"),
    (["--runs", "e2e", "--runs", "segprop:p=2"], "run 'segprop-p2' (segprop:p=2): segprop.base_depth + "
                                                 "segprop.last_layers = 2 + 2 leaves no middle layer in a 4-layer model"),
    (["--runs", "segprop:p=0", "--runs", "segprop:p=0,training.learning_rate=0.1"],
     "duplicate run name 'segprop-p0' (runs 1 and 2)"),
    (["--runs", "lw:p=1,run_dir=/elsewhere"], "run 'lw-p1': run_dir is set by the comparison"),
    (["--runs", "e2e", "--set", "segprop.mode=lw"], "--set: segprop.mode is set by the comparison"),
    (["--runs", "segprop:p=0", "--runs", "lw:p=1,data.seq_len=16"], "runs 'segprop-p0' and 'lw-p1' differ in data"),
    (["--runs", "segprop:p=zero"], "run 'segprop:p=zero': p: Input should be a valid integer"),
    (["--runs", "lw:p=1,name=my run"], "run name 'my run': use letters, digits"),
    ([], "is a run config: name the runs with --runs MODE[:KEY=VALUE,...]"),
]


@pytest.mark.parametrize("args,message", BAD_SETS, ids=[message.split(":")[0][:30] for _, message in BAD_SETS])
def test_bad_set_is_refused_in_one_line_before_any_run(tmp_path, capsys, monkeypatch, inputs, args, message):
    monkeypatch.setattr(Driver, "run", lambda self: pytest.fail("a run started"))
    config = base_config(tmp_path, inputs)
    code, _, err = run_cli(capsys, "compare", str(config), "--out", str(tmp_path / "cmp"), *args)
    assert code == 2 and message in one_line_error(err)
    assert not (tmp_path / "cmp" / "runs").exists()


def test_short_keys_set_what_they_name_and_the_shared_config_gives_a_mode_only_what_it_uses(tmp_path, inputs):
    """``lora_r`` is the LoRA rank; p and last layers from the shared config (or set-wide overrides) are taken back to
    their defaults for the modes that do nothing with them, instead of refusing those runs."""
    config = base_config(tmp_path, inputs, segprop={"base_depth": 1, "last_layers": 1})
    compare = load_compare(config, runs=["lora:lora_r=16", "segprop:ll=0,lora_r=4", "lw", "e2e"],
                           out=str(tmp_path / "cmp"), overrides=["segprop.segment_layers=2"])
    runs = {run.name: run.cfg.segprop for run in compare.runs}
    assert list(runs) == ["lora-lora_r16", "segprop-ll0-lora_r4", "lw", "e2e"]
    assert runs["lora-lora_r16"].adapter_spec().r == 16 and runs["segprop-ll0-lora_r4"].adapter_spec().r == 4
    shape = {name: (s.base_depth, s.last_layers, s.effective_last_layers, s.segment_layers) for name, s in runs.items()}
    assert shape == {"lora-lora_r16": (0, 2, 0, 1), "segprop-ll0-lora_r4": (1, 0, 0, 2), "lw": (1, 2, 0, 2),
                     "e2e": (0, 2, 0, 1)}


def test_a_shared_adapter_and_ll_baseline_reach_only_the_modes_that_use_them(tmp_path, inputs):
    """A set whose shared config trains LoRA segments still runs its lw and e2e baselines: they take no adapter (lw and
    e2e refuse one) and e2e keeps the input model's LL (it has no Stage 2)."""
    config = base_config(tmp_path, inputs, segprop={"base_depth": 1, "ll_baseline": "stage1",
                                                    "adapter": {"type": "lora", "r": 4}})
    compare = load_compare(config, runs=["segprop", "lw", "e2e", "lora"], out=str(tmp_path / "cmp"))
    runs = {run.name: run.cfg.segprop for run in compare.runs}
    assert {name: (s.adapter is not None, s.ll_baseline) for name, s in runs.items()} == {
        "segprop": (True, "stage1"), "lw": (False, "stage1"), "e2e": (False, "input"), "lora": (True, "input")}


def test_no_compare_directory_is_refused(tmp_path, inputs):
    with pytest.raises(ConfigError, match=r"^no compare directory: pass --out DIR \(or out: in the compare spec\)$"):
        load_compare(base_config(tmp_path, inputs), runs=["e2e"])


def test_run_directory_of_another_config_is_refused_and_kept(tmp_path, capsys, inputs):
    config = base_config(tmp_path, inputs)
    earlier = load_compare(config, runs=["segprop:p=0"], out=str(tmp_path / "cmp")).runs[0].cfg
    setup = Driver(earlier).prepare()  # a run directory made with the earlier settings
    setup.lease.release()
    manifest = (tmp_path / "cmp/runs/segprop-p0/manifest.json").read_bytes()
    code, _, err = run_cli(capsys, "compare", str(config), "--out", str(tmp_path / "cmp"), "--runs", "e2e",
                           "--runs", "segprop:p=0", "--set", "training.learning_rate=0.5")
    line = one_line_error(err)
    assert code == 2 and "run 'segprop-p0': " in line and "differs in: training.learning_rate" in line
    assert (tmp_path / "cmp/runs/segprop-p0/manifest.json").read_bytes() == manifest
    assert not (tmp_path / "cmp/runs/e2e").exists()


def test_report_only_on_s3_reports_the_runs_present(tmp_path, capsys, inputs, s3_bucket):
    from segprop_ray.storage.fs import resolve_filesystem

    config, out = base_config(tmp_path, inputs), f"s3://{s3_bucket}/cmp"
    setup = Driver(load_compare(config, runs=["segprop:p=0"], out=out).runs[0].cfg).prepare()  # a run, started
    setup.lease.release()
    store = ManifestStore(setup.layout)
    store.update(store.read(), lambda m: m.layers.update({"0": record(0, "stage1", 2.5, 0.5)}))
    code, stdout, _ = run_cli(capsys, "compare", str(config), "--out", out, "--runs", "segprop:p=0", "--runs", "e2e",
                              "--report-only")
    assert code == 0 and f"report.md: {out}/report/report.md" in stdout
    fs, _ = resolve_filesystem(out)
    markdown = fs.cat_file(f"{s3_bucket}/cmp/report/report.md").decode()
    headings, rows = markdown_table(markdown, "Table 1: held-out loss (eval loss) by exit depth")
    assert headings == ["depth", "segprop-p0"] and rows == [["0", "2.5000"]]  # e2e has no run directory yet
    assert "`segprop-p0` (`segprop:p=0`): running" in markdown
    assert fs.cat_file(f"{s3_bucket}/cmp/report/metric_vs_depth.png")[:8] == PNG_MAGIC
    assert not fs.exists(f"{s3_bucket}/cmp/runs/e2e")


# -- the report, from manifests -------------------------------------------------------------------------
def record(depth: int, stage: str, eval_loss: float, accuracy: float | None, status: str = "done") -> LayerRecord:
    metrics = {"tokens": 1000 + depth, "world_size": 2, "wall_s": 10.0 + depth, "driver_wall_s": 15.0 + depth,
               "peak_memory_bytes": (100 + 10 * depth) << 20}
    if accuracy is not None:
        metrics["accuracy"] = accuracy
    return LayerRecord(depth=depth, stage=stage, status=status, steps=5, eval_loss=eval_loss,
                       perplexity=math.exp(eval_loss), metrics=metrics)


def synthetic_run(tmp_path: Path, name: str, mode: str, p: int, r: int, scores: dict, baseline: dict | None = None,
                  running: int | None = None) -> tuple[str, str, Manifest]:
    """A run of a 6-layer model written as a manifest: ``scores`` is depth -> (eval loss, accuracy)."""
    model = ModelInfo(uri="/models/tiny", architecture="LlamaForCausalLM", family="llama", num_layers=6,
                      hidden_size=32, vocab_size=80, tied_embeddings=False)
    stage = lambda d: "e2e" if mode == "e2e" else "stage1" if d == p else "stage2"  # noqa: E731
    layers = {str(d): record(d, stage(d), *score) for d, score in scores.items()}
    if running is not None:
        layers[str(running)] = record(running, "stage2", 9.9, 0.99, status="running")
    manifest = Manifest(run_id=f"{name}-id", config_hash="0" * 64, mode=mode, base_depth=p, last_layers=r, model=model,
                        group_size=4, layers=layers, state="running" if running is not None else "done",
                        final_depth=max(scores), baseline=baseline)
    uri = str(tmp_path / "runs" / name)
    ManifestStore(RunLayout.open(uri)).write(manifest)
    return name, uri, manifest


def markdown_table(markdown: str, title: str) -> tuple[list[str], list[list[str]]]:
    block = markdown.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    lines = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in block.splitlines() if line.startswith("|")]
    return lines[0], lines[2:]


def test_report_is_table1_with_a_column_per_run_and_the_compute_beside_each_score(tmp_path):
    runs = [synthetic_run(tmp_path, "segprop-p1", "segprop", 1, 2, {1: (2.5, 0.30), 2: (2.1, 0.45), 3: (1.9, 0.52)},
                          baseline={"eval_loss": 4.0, "perplexity": math.exp(4.0), "accuracy": 0.25}),
            synthetic_run(tmp_path, "lw-p1", "lw", 1, 0, {1: (2.6, 0.28), 2: (2.7, 0.27), 3: (2.8, 0.26)}, running=4),
            synthetic_run(tmp_path, "e2e", "e2e", 5, 0, {5: (1.95, 0.50)})]
    written = write_compare_report(str(tmp_path), runs, {"runs": {"segprop-p1": "segprop:p=1"}})
    markdown = Path(written["report.md"]).read_text()
    headings, rows = markdown_table(markdown, "Table 1: held-out loss (eval loss) by exit depth")
    assert headings == ["depth", "segprop-p1", "lw-p1", "e2e", "input model"]
    assert rows == [["1", "2.5000", "2.6000", "-", "-"], ["2", "2.1000", "2.7000", "-", "-"],
                    ["3", "1.9000", "2.8000", "-", "-"], ["5", "-", "-", "1.9500", "4.0000"]]  # depth 4: still training
    _, accuracy = markdown_table(markdown, "Table 1: multiple-choice accuracy by exit depth")
    assert accuracy[0] == ["1", "30.0%", "28.0%", "-", "-"] and accuracy[-1] == ["5", "-", "-", "50.0%", "25.0%"]
    headings, per_run = markdown_table(markdown, "Score and compute per run")
    assert headings[:3] == ["run", "mode", "p"] and headings[-3:] == ["training tokens", "wall s", "peak memory"]
    assert per_run[0] == ["segprop-p1", "segprop", "1", "2", "done", "3", "3", "1.9000", "3", "1.9000", "52.0%",
                          f"{2 * (1001 + 1002 + 1003):,}", f"{16 + 17 + 18:.1f}", "130.0 MiB"]
    assert per_run[1][4:6] == ["running", "3"] and per_run[1][-3] == f"{2 * (1001 + 1002 + 1003):,}"  # done work only
    assert "`segprop-p1` (`segprop:p=1`): done" in markdown and "![score by depth](metric_vs_depth.png)" in markdown
    assert "- **input model**: eval loss 4.0000, accuracy 25.0% (scored by run `segprop-p1`)" in markdown
    table = list(csv.DictReader(io.StringIO(Path(written["table1.csv"]).read_text())))
    assert [row["depth"] for row in table] == ["1", "2", "3", "5"]
    assert float(table[0]["lw-p1 eval_loss"]) == 2.6 and table[3]["segprop-p1 accuracy"] == ""
    assert float(table[3]["input model accuracy"]) == 0.25
    long_rows = list(csv.DictReader(io.StringIO(Path(written["report.csv"]).read_text())))
    assert [(row["run"], row["depth"]) for row in long_rows] == [
        ("segprop-p1", "1"), ("segprop-p1", "2"), ("segprop-p1", "3"), ("lw-p1", "1"), ("lw-p1", "2"), ("lw-p1", "3"),
        ("e2e", "5")]
    data = json.loads(Path(written["report.json"]).read_text())
    assert data["table1"]["columns"] == ["segprop-p1", "lw-p1", "e2e", "input model"]
    assert set(data["plots"]) == {"Score by depth", "Efficiency by depth"}  # no per-iteration curves, no nHSIC here
    for name in data["plots"].values():
        assert (tmp_path / "report" / name).read_bytes()[:8] == PNG_MAGIC


def test_report_without_multiple_choice_or_baseline_has_only_the_loss_table(tmp_path):
    runs = [synthetic_run(tmp_path, "a", "segprop", 0, 2, {0: (3.0, None), 1: (2.0, None)}),
            synthetic_run(tmp_path, "b", "lw", 0, 0, {0: (3.1, None)})]
    markdown = Path(write_compare_report(str(tmp_path), runs)["report.md"]).read_text()
    headings, rows = markdown_table(markdown, "Table 1: held-out loss (eval loss) by exit depth")
    assert headings == ["depth", "a", "b"] and rows == [["0", "3.0000", "3.1000"], ["1", "2.0000", "-"]]
    assert "accuracy by exit depth" not in markdown and "not scored" in markdown


# -- end to end ------------------------------------------------------------------------------------------
def tree_state(root: Path) -> dict[str, tuple[str, int]]:
    """Every file under ``root``: relative path -> (sha256, mtime in ns)."""
    return {str(path.relative_to(root)): (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns)
            for path in sorted(root.rglob("*")) if path.is_file()}


@pytest.mark.slow
def test_compare_writes_table1_and_continues_an_interrupted_set(local_ray, tmp_path, capsys, monkeypatch, inputs):
    config = base_config(tmp_path, inputs, training={"max_steps": 2, "save_steps": 1})
    spec = tmp_path / "set.yaml"
    spec.write_text(yaml.safe_dump({"config": "run.yaml", "out": "cmp", "runs": ["segprop:p=0", "lw:p=2", "e2e"]}))
    runs = tmp_path / "cmp" / "runs"
    original_train = Driver.train_depth

    def interrupted(self, depth):  # Ctrl-C as the lw run starts training, after its tokens are written
        if self.cfg.segprop.mode == "lw":
            raise KeyboardInterrupt
        return original_train(self, depth)

    monkeypatch.setattr(Driver, "train_depth", interrupted)
    code, out, _ = run_cli(capsys, "compare", str(spec))
    assert code == 130 and "[2/3] lw-p2: stopped" in out
    states = {name: ManifestStore(RunLayout.open(str(runs / name))).read() for name in ("segprop-p0", "lw-p2")}
    assert (states["segprop-p0"].state, states["lw-p2"].state) == ("done", "failed") and not (runs / "e2e").exists()
    finished, lw_tokens = tree_state(runs / "segprop-p0"), tree_state(runs / "lw-p2" / "tokens")

    monkeypatch.setattr(Driver, "train_depth", original_train)
    trained = []
    from segprop_ray.pipeline import driver

    def counting(ctx, name, **kwargs):
        trained.append(name)
        return real_trainer(ctx, name=name, **kwargs)

    real_trainer = driver.run_trainer
    monkeypatch.setattr(driver, "run_trainer", counting)
    code, out, _ = run_cli(capsys, "compare", str(spec))
    assert tree_state(runs / "segprop-p0") == finished  # the finished run: not a byte or an mtime changed
    assert tree_state(runs / "lw-p2" / "tokens") == lw_tokens  # the interrupted one resumed after its tokens
    manifests = {name: ManifestStore(RunLayout.open(str(runs / name))).read() for name in ("segprop-p0", "lw-p2", "e2e")}
    assert sorted(trained) == sorted([f"{manifests['lw-p2'].run_id}-depth2", f"{manifests['lw-p2'].run_id}-depth3",
                                      f"{manifests['e2e'].run_id}-depth{NUM_LAYERS - 1}"])
    assert code == 0 and "[1/3] segprop-p0: done, skipped" in out and "[2/3] lw-p2: continuing" in out
    assert manifests["lw-p2"].steps["tokenize"].attempts == 1
    assert all(m.state == "done" for m in manifests.values())
    assert manifests["segprop-p0"].baseline and not manifests["lw-p2"].baseline and not manifests["e2e"].baseline
    assert_table1_matches(Path(tmp_path / "cmp" / "report" / "report.md").read_text(), manifests)


def assert_table1_matches(markdown: str, manifests: dict[str, Manifest]) -> None:
    """Table 1's cells are exactly the runs' committed scores, a row per depth, the input model on the last row."""
    depths = sorted({d for m in manifests.values() for d in m.committed_depths()} | {NUM_LAYERS - 1})
    assert depths == [0, 1, 2, 3]
    baseline = manifests["segprop-p0"].baseline
    for metric, title in (("eval_loss", "held-out loss (eval loss)"), ("accuracy", "multiple-choice accuracy")):
        headings, rows = markdown_table(markdown, f"Table 1: {title} by exit depth")
        assert headings == ["depth", "segprop-p0", "lw-p2", "e2e", "input model"]
        expected = [[str(d)] + [fmt(metric, _score(m, d, metric)) for m in manifests.values()]
                    + [fmt(metric, baseline[metric] if d == NUM_LAYERS - 1 else None)] for d in depths]
        assert rows == expected
        assert sum(cell != "-" for row in rows for cell in row[1:]) == 2 + 2 + 1 + 1  # exits 0, 1 | 2, 3 | 3 | input


def _score(manifest: Manifest, depth: int, metric: str):
    record = manifest.layer(depth)
    if record is None:
        return None
    return record.eval_loss if metric == "eval_loss" else record.metrics.get(metric)
