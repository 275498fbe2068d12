"""Training-step benchmark: the project's own workers against the reference loops, one device, one run.

Times, with the project's code (``SegmentRun`` / ``SegmentLoop`` / ``ModelParts`` / the SnapCheck storage,
on a real run directory), the variants of the reference script ``gpu_reference_loops.py`` (the anchor of
../shared/reference/, loaded from there unless ``--reference-dir`` or SEGPROP_REFERENCE_DIR say otherwise), and
runs that script in the same command on the same device and shape:

  e2e            the whole model (SegmentRun of an e2e run, from token shards)
  seg_snap       Stage 2 step q = p+1 from SnapCheck shards S[p] (SegmentRun, streaming reader)
  seg_recompute  the same step with the frozen prefix recomputed under no_grad (no snapshot)
  lw_snap        layer-wise (r = 0) step from S[p]
  snap_write     the snapshot job's work: transform_file S[p] -> S[p+1] with one committed layer
  read_shards    the streaming reader alone over S[p] (what it could feed a worker)
  + depth scaling: seg_snap and seg_recompute at p = 1 and p = n - r - 2

For each: tokens/s at the median step, peak memory (CUDA max allocated; on CPU the process RSS high-water
mark, each variant in a fresh process by default), FLOPs per token, share of step time waiting on shard
reads. Prints tables and the goals, writes JSON (``--out``). Never imports Ray.

  python benchmarks/segprop_bench.py                                   # CPU, cpu_small shape, a few minutes
  python benchmarks/segprop_bench.py --device cuda --shape llama1b     # or mistral7b_12l / mistral7b
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_report  # noqa: E402
import bench_snapcheck  # noqa: E402
import bench_setup  # noqa: E402
from bench_setup import SHAPE_DEFAULTS, BenchPlan, make_plan  # noqa: E402

HERE = Path(__file__).resolve().parent
PROJECT_VARIANTS = ("e2e", "seg_snap", "seg_recompute", "lw_snap", "snap_write", "read_shards")
REFERENCE_VARIANTS = "e2e,e2e_ac,seg_snap,seg_recompute,lw_snap,snap_write"
RESULT_PREFIX = "BENCH_RESULT "


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", default=None, help="cpu_small (CPU default), llama1b (CUDA default), mistral7b_12l, "
                                                  "mistral7b, tiny")
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per variant (after --warmup)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (the reference always does 2)")
    ap.add_argument("--prefix", type=int, default=None, help="p (default as the reference: min(n/2, n-r-2))")
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--variants", default=None, help="project variants (default: all; no e2e for mistral7b)")
    ap.add_argument("--no-depth-scaling", action="store_true", help="skip seg_* at p=1 and p=n-r-2")
    ap.add_argument("--reference-variants", default=None, help="'' to skip the reference (default: all of its "
                                                                 "variants; for mistral7b e2e_ac but no e2e)")
    ap.add_argument("--no-ref-depth-scaling", action="store_true", help="skip the reference at p=1 and p=n-r-2")
    ap.add_argument("--isolate", choices=["auto", "variant", "shape", "none"], default="auto",
                    help="a fresh process per project variant (auto on CPU: RSS peaks are per process), one "
                         "process for all (auto on CUDA: peaks reset per variant), or all in this process")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved repeats; the best median is kept")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (0: torch's default). Default 1 on CPU: on a shared 2-core VM two "
                         "threads stall at every op's barrier whenever another process runs (10x swings seen)")
    ap.add_argument("--groups-per-file", type=int, default=4)
    ap.add_argument("--snap-files", type=int, default=1, help="files snap_write writes at once (files_per_actor)")
    ap.add_argument("--snap-tokens", type=int, default=65_536,
                    help="tokens snap_write transforms at least, in passes over the train split that each rewrite its "
                         "files (a job's steady state, not one pass's start-up; 0: one pass)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="the project's default (HF's) is 1.0")
    ap.add_argument("--loss-chunk-tokens", type=int, default=0, help="training.loss_chunk_tokens (0: the default)")
    ap.add_argument("--warm", action="store_true", help="leave shards in the page cache (default: evicted)")
    ap.add_argument("--work-dir", default=None, help="default: a temporary directory, removed at the end")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/segprop_bench.<shape>.<device>.json)")
    ap.add_argument("--reference-dir", default=None, help="directory of gpu_reference_loops.py (default: "
                                                          "$SEGPROP_REFERENCE_DIR, else ../shared/reference, else .reference)")
    args = ap.parse_args(argv)
    if args.reference_dir:
        os.environ[bench_setup.REFERENCE_ENV] = str(Path(args.reference_dir).resolve())  # for the variant processes
    args.shape = args.shape or ("llama1b" if args.device == "cuda" else "cpu_small")
    for key, value in SHAPE_DEFAULTS.get(args.shape, SHAPE_DEFAULTS["llama1b"]).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    full_7b = args.shape == "mistral7b"  # E2E fits only with activation checkpointing there (anchors.md)
    if args.variants is None:
        args.variants = ",".join(v for v in PROJECT_VARIANTS if not (full_7b and v == "e2e"))
    if args.reference_variants is None:
        args.reference_variants = REFERENCE_VARIANTS.replace("e2e,", "") if full_7b else REFERENCE_VARIANTS
    if args.threads is None:
        args.threads = 1 if args.device == "cpu" else 0
    if args.isolate == "auto":
        args.isolate = "shape" if args.device == "cuda" else "variant"
    return args


def project_variants(args: argparse.Namespace, plan: BenchPlan) -> list[str]:
    """Variant names: the default-p ones, then the depth-scaling ones (``kind@p<d>``), without repeats."""
    names = [v for v in args.variants.split(",") if v]
    if not args.no_depth_scaling:
        for kind in ("seg_snap", "seg_recompute"):
            names += [f"{kind}@p{d}" for d in (1, plan.deep) if d != plan.prefix]
    return list(dict.fromkeys(names))


def reference_runs(args: argparse.Namespace, plan: BenchPlan) -> list[tuple[int, str]]:
    """(prefix, variants) of each reference invocation."""
    if not args.reference_variants:
        return []
    runs = [(plan.prefix, args.reference_variants)]
    if not args.no_ref_depth_scaling:
        runs += [(d, "seg_snap,seg_recompute") for d in (1, plan.deep) if d != plan.prefix]
    return runs


class Runner:
    """Runs the setup and the variants in subprocesses (or in this process with ``--isolate none``), handing
    each record to ``sink`` as soon as it arrives (a variant that fails gives a record with ``error``)."""

    def __init__(self, args: argparse.Namespace, plan_path: Path, plan_prefix: int, sink: Callable[[dict], None]):
        self.args, self.plan_path, self.plan_prefix, self.sink = args, plan_path, plan_prefix, sink
        self.env = {**os.environ, bench_setup.ENV_CACHE: str(plan_path.parent / "cache"), "PYTHONUNBUFFERED": "1"}
        if args.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the reference picks CUDA whenever it sees one

    def _python(self, script: str, *argv: str, on_record: Callable[[dict], None] | None = None) -> str | None:
        """Run a helper script; its ``BENCH_RESULT`` lines go to ``on_record`` as they come. Returns an error or None."""
        cmd = [sys.executable, str(HERE / script), str(self.plan_path), *argv]
        tail: list[str] = []
        with subprocess.Popen(cmd, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
            timer = threading.Timer(self.args.timeout, proc.kill)
            timer.start()
            for line in proc.stdout:
                if line.startswith(RESULT_PREFIX) and on_record is not None:
                    on_record(json.loads(line[len(RESULT_PREFIX):]))
                else:
                    tail = (tail + [line])[-40:]
            timer.cancel()
        if proc.returncode != 0:
            return f"{script} {' '.join(argv)[:200]} exited {proc.returncode}: {''.join(tail)[-2500:]}"
        return None

    def setup(self) -> BenchPlan:
        if self.args.isolate == "none":
            return bench_setup.prepare(BenchPlan.load(self.plan_path))
        error = self._python("bench_setup.py")
        if error:
            raise SystemExit(f"set-up failed: {error}")
        return BenchPlan.load(self.plan_path)

    def project(self, names: list[str]) -> None:
        warm = ["--warm"] if self.args.warm else []
        if self.args.isolate == "none":
            import bench_variants

            plan = BenchPlan.load(self.plan_path)
            for name in names:
                self.sink(bench_variants.run_variant_safely(plan, name, not self.args.warm))
            return
        groups = [names] if self.args.isolate == "shape" else [[name] for name in names]
        for group in groups:
            seen: list[str] = []
            error = self._python("bench_variants.py", ",".join(group), *warm,
                                 on_record=lambda r: (seen.append(r["variant"]), self.sink(r)))
            for name in group:
                if error and name not in seen:
                    self.sink({"impl": "project", "variant": name, "error": error})

    def reference(self, prefix: int, variants: str) -> None:
        a = self.args
        argv = ["--shape", a.shape, "--seq", str(a.seq), "--batch", str(a.batch), "--steps", str(a.steps),
                "--prefix", str(prefix), "--r", str(a.r), "--variants", variants]

        def relabel(record: dict) -> None:
            if record["header"].get("prefix") != prefix:
                raise SystemExit(f"reference ran at prefix {record['header'].get('prefix')}, asked {prefix}")
            record["prefix"] = prefix
            if prefix != self.plan_prefix:
                record["variant"] = f"{record['variant']}@p{prefix}"
            self.sink(record)

        if a.isolate == "none" and _in_process_device_ok(a.device):
            import bench_variants

            for record in bench_variants.run_reference(BenchPlan.load(self.plan_path), argv):
                relabel(record)
            return
        error = self._python("bench_variants.py", "reference", "--", *argv, on_record=relabel)
        if error:
            self.sink({"impl": "reference", "variant": f"reference@p{prefix}", "error": error})


def _in_process_device_ok(device: str) -> bool:
    import torch

    return torch.cuda.is_available() == (device == "cuda")


def machine_info(device: str) -> dict[str, Any]:
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    return {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": device, "command": " ".join([Path(sys.executable).name, *sys.argv])}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="segprop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args, work)
    out = Path(args.out or HERE / "results" / f"segprop_bench.{args.shape}.{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = machine_info(args.device)
    meta["args"] = vars(args)
    if args.reference_variants:
        meta["reference_dir"] = os.path.relpath(bench_setup.reference_dir(), bench_setup.ROOT)
    records: list[dict[str, Any]] = []
    repeat = [0]

    def sink(record: dict[str, Any]) -> None:  # print, keep, and save what is there so far
        record["repeat"] = repeat[0]
        records.append(record)
        print(bench_report.progress_line(record), flush=True)
        out.write_text(json.dumps({"meta": meta, "plan": asdict(plan), "partial": True, "records": records}, indent=1))

    runner = Runner(args, plan.save(), plan.prefix, sink)
    started = time.perf_counter()
    try:
        print(f"setting up {args.shape} (seq {args.seq}, batch {args.batch}, p={plan.prefix}, r={args.r}, "
              f"device {args.device}) in {work}", flush=True)
        plan = runner.setup()
        print(f"set-up done: {plan.setup_s}", flush=True)
        names = project_variants(args, plan)
        main_names, depth_names = [n for n in names if "@p" not in n], [n for n in names if "@p" in n]
        ref_main, *ref_depth = reference_runs(args, plan) or [None]
        for repeat[0] in range(args.repeats):  # the main rows first, so a run cut short keeps the ratios
            if ref_main:
                runner.reference(*ref_main)
            runner.project(main_names)
            for prefix, variants in ref_depth:
                runner.reference(prefix, variants)
            if depth_names:
                runner.project(depth_names)
    finally:
        if not args.keep and args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    report = bench_report.build(plan, records)
    report["snapcheck"] = bench_snapcheck.build(plan, records)
    print(bench_report.render(report))
    print(bench_snapcheck.render(report["snapcheck"]))
    out.write_text(json.dumps({"meta": meta, "plan": asdict(plan), **report, "records": records}, indent=1))
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()
