"""Segment benchmark: Stage 2 iterations of k layers and of half layers, LoRA segments and the LoRA baseline.

Times one Stage 2 iteration of each segment kind with the project's own worker body (``SegmentRun``, fed
from SnapCheck shards S[p] by the streaming reader, as a Ray Train worker runs it), on the run directory
that ``bench_setup`` prepares (the training-step benchmark's set-up, with p = 1 so that 8 middle layers
follow), and counts the Ray Train start-ups a whole run needs at this shape and at the 1B and 7B shapes:

  seg_k1        one middle layer + LL (segment_layers 1: the default)
  seg_k2        layers p+1..p+2 + LL (segment_layers 2)
  seg_k4        layers p+1..p+4 + LL (segment_layers 4)
  sub_attn      the attention half of layer p+1 + LL (granularity sublayer; the MLP half frozen)
  sub_mlp       the MLP half of layer p+1 + LL (its attention recomputed, frozen)
  lora_seg      seg_k1 with LoRA adapters (PEFT's default: r 8, alpha 8, q_proj and v_proj)
  lora_e2e      mode lora: adapters on every layer, from the token shards
  e2e           full fine-tuning of every layer, from the token shards (the scale LoRA e2e is read against)
  stage1        Stage 1: embeddings + layers 0..p + LL + head, from the token shards
  stage1_8bit   the same with training.optim adamw_8bit (CUDA, bitsandbytes)
  snap_write    the snapshot job of one layer: S[p+1] = f_{p+1}(S[p]), every file (bench_variants.run_snap_write)
  e2e_uncapped  e2e without the memory cap (``--cap-gib``), to see what E2E itself needs

With ``--cap-gib G`` (CUDA) every variant process runs under ``torch.cuda.set_per_process_memory_fraction``
of G GiB, as on a G GiB card: a variant that does not fit records its out-of-memory error (``oom``).

Each variant runs in a fresh process (its RSS peak is its own); on CPU the tensor peak is measured on one
extra step (``TensorPeakProbe``). Repeats are interleaved and the best median step is kept. Writes
``benchmarks/results/segment_bench.<shape>.<device>.json``. Never imports Ray.

  python benchmarks/segment_bench.py                 # CPU, cpu_small shape, about 5 minutes on 2 cores
  python benchmarks/segment_bench.py --device cuda --shape llama1b
  python benchmarks/segment_bench.py --device cuda --shape llama1b --variants seg_k1 --head-loss fused   # vs chunked

``--head-loss`` is the jobs' ``training.head_loss`` (``auto``: the fused kernel where it runs); each record says
which loss its segment ran (``head_loss``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_setup  # noqa: E402
from bench_setup import SHAPE_DEFAULTS, TOKENS_HASH, BenchPlan, snapshot_hash  # noqa: E402

HERE = Path(__file__).resolve().parent
PREFIX = "SEGMENT_RESULT "
CAP_ENV = "SEGMENT_BENCH_CAP_GIB"
LORA = {"type": "lora"}  # PEFT's defaults: r 8, alpha 8, dropout 0, the family's default targets
VARIANTS: dict[str, dict[str, Any]] = {
    "seg_k1": {"segprop": {"segment_layers": 1}},
    "seg_k2": {"segprop": {"segment_layers": 2}},
    "seg_k4": {"segprop": {"segment_layers": 4}},
    "sub_attn": {"segprop": {"granularity": "sublayer"}, "part": "attn"},
    "sub_mlp": {"segprop": {"granularity": "sublayer"}, "part": "mlp"},
    "lora_seg": {"segprop": {"adapter": LORA}},
    "lora_e2e": {"segprop": {"mode": "lora"}, "end_to_end": True},
    "e2e": {"segprop": {"mode": "e2e"}, "end_to_end": True},
    "stage1": {"segprop": {}, "stage1": True},
    "stage1_8bit": {"segprop": {}, "stage1": True, "training": {"optim": "adamw_8bit"}},
    "snap_write": {"segprop": {}, "snapshot": True},
    "e2e_uncapped": {"segprop": {"mode": "e2e"}, "end_to_end": True, "uncapped": True},
}
"""Variant -> the ``segprop`` (and ``training``) settings of its run and which iteration it times (Stage 2: the
first segment after p, or the ``part`` of its layer; ``stage1``; ``end_to_end``; ``snapshot``: the snapshot job)."""
DEFAULT_VARIANTS = "seg_k1,seg_k2,seg_k4,sub_attn,sub_mlp,lora_seg,lora_e2e,e2e"
STARTUP_SHAPES = {"cpu_small": (12, 1, 2), "llama1b": (16, 1, 2), "mistral7b": (32, 1, 2)}
"""Shape -> (layers, p, r) for the Ray Train start-up counts of a whole run (p = 1: Stage 2 trains all but 4 layers)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command's options, with the shape's defaults filled in (p = 1, r = 2, the training-step bench's settings)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--shape", default=None, help="cpu_small (CPU default), llama1b (CUDA default), mistral7b_12l")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--cap-gib", type=float, default=0, help="CUDA memory cap per variant process (0: none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default 1 on CPU, as segprop_bench)")
    ap.add_argument("--timeout", type=float, default=1200)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--work-dir", default=None, help="where the model and shards go (default: the system's temp dir)")
    ap.add_argument("--head-loss", choices=["auto", "chunked", "fused"], default="auto",
                    help="training.head_loss of every variant (fused: Liger Kernel on CUDA)")
    args = ap.parse_args(argv)
    args.shape = args.shape or ("llama1b" if args.device == "cuda" else "cpu_small")
    defaults = SHAPE_DEFAULTS.get(args.shape, SHAPE_DEFAULTS["llama1b"])
    args.seq, args.batch = args.seq or defaults["seq"], args.batch or defaults["batch"]
    args.steps = args.steps or defaults["steps"]
    args.threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else 0)
    args.prefix, args.r, args.lr, args.max_grad_norm, args.loss_chunk_tokens, args.groups_per_file = 1, 2, 1e-6, 1.0, 0, 4
    return args


def startups(num_layers: int, p: int, r: int) -> dict[str, int]:
    """Ray Train start-ups (iterations: Stage 1 + Stage 2's segments) of a whole run, per setting."""
    from segprop_ray.core.adapter_spec import LoraSpec
    from segprop_ray.core.plan import SegPropPlan

    plans = {f"segment_layers {k}": SegPropPlan(num_layers, p, r, segment_layers=k) for k in (1, 2, 4)}
    plans["sublayer"] = SegPropPlan(num_layers, p, r, granularity="sublayer")
    plans["lora e2e"] = SegPropPlan(num_layers, num_layers - 1, 0, "lora", adapter=LoraSpec())
    return {name: len(plan.iterations) for name, plan in plans.items()}


def add_half_files(plan: BenchPlan) -> None:
    """What layer p+1's attention half leaves for its MLP half: ``layers/layer-<q>-attn`` and its exit (the input
    model's weights: the values do not matter to the timings)."""
    from segprop_ray.core.weights import SafetensorsSource
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.weights_store import WeightStore, exit_file, layer_file

    q = plan.prefix + 1
    base = SafetensorsSource.from_model_dir(plan.model_dir)
    store = WeightStore(RunLayout.open(plan.run_dir), plan.cache_dir)
    layer = {name: base.get(name) for name in base.keys() if name.startswith(f"model.layers.{q}.")}
    ll = tuple(f"model.layers.{i}." for i in range(plan.num_layers - plan.r, plan.num_layers))
    head = {name: base.get(name) for name in base.keys() if name.startswith(ll + ("model.norm.", "lm_head."))}
    plan.files[layer_file(f"{q}-attn")] = store.put(layer_file(f"{q}-attn"), layer)
    plan.files[exit_file(f"{q}-attn")] = store.put(exit_file(f"{q}-attn"), head)
    plan.save()


def job(plan: BenchPlan, name: str):
    """The ``JobContext`` the driver would hand the worker of variant ``name``."""
    from segprop_ray.pipeline.context import JobContext

    spec = VARIANTS[name]
    config = plan.job_config(spec["segprop"].get("mode", "segprop"), plan.prefix)
    config["segprop"].update(spec["segprop"])
    config["training"].update(spec.get("training", {}))
    blocks = {"train": plan.train_blocks, "eval": plan.eval_blocks}
    if spec.get("end_to_end") or spec.get("stage1"):
        depth = plan.num_layers - 1 if spec.get("end_to_end") else plan.prefix
        return JobContext(config, depth, plan.group_size, blocks, dict(plan.files), TOKENS_HASH)
    it = first_segment(config, plan.num_layers, spec.get("part", "layer"))
    return JobContext(config, it.last, plan.group_size, blocks, dict(plan.files), snapshot_hash(plan.prefix), part=it.part)


def first_segment(config: dict[str, Any], num_layers: int, part: str):
    """The run's first Stage 2 iteration training ``part`` (the segment after p: it reads S[p])."""
    from segprop_ray.config import Config
    from segprop_ray.core.plan import SegPropPlan

    plan = SegPropPlan.from_config(Config.model_validate(config).segprop, num_layers)
    return next(it for it in plan.iterations if it.stage == "stage2" and it.part == part)


def run_one(plan: BenchPlan, name: str) -> dict[str, Any]:
    """One variant in this process: build the worker, train it under the step timer and the memory probes."""
    import time

    import torch
    from bench_probes import load_average, peak_since_reset, process_max_rss, reset_peak, rss_bytes, threads
    from bench_variants import import_libraries, train_timed

    from segprop_ray.pipeline.segment_run import SegmentRun

    device = torch.device(plan.device)
    import_libraries()
    if "adapter" in VARIANTS[name]["segprop"] or VARIANTS[name]["segprop"].get("mode") == "lora":
        import peft  # noqa: F401 - imported before the RSS baseline, as the other libraries
    cap = float(os.environ.get(CAP_ENV, 0) or 0)
    if cap and device.type == "cuda" and not VARIANTS[name].get("uncapped"):
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / torch.cuda.get_device_properties(device).total_memory))
    baseline, load_before = rss_bytes(), load_average()
    reset_peak(device)
    with threads(plan.threads):
        start = time.perf_counter()
        if VARIANTS[name].get("snapshot"):
            from bench_variants import run_snap_write

            result, label, optimizer = run_snap_write(plan, plan.prefix, device), f"snapshot S[{plan.prefix + 1}]", 0
        else:
            run = SegmentRun(job(plan, name), device)
            build_s = time.perf_counter() - start
            result = train_timed(plan, run.loop, run.model, device)
            result["build_s"] = round(build_s, 3)
            result["head_loss"] = head_loss_ran(run.model)
            label, optimizer = run.it.label, optimizer_bytes(run.loop.optimizer)
    result.update(variant=name, label=label, peak_bytes=peak_since_reset(device), cap_gib=cap or None,
                  process_max_rss_bytes=process_max_rss(), baseline_rss_bytes=baseline,
                  load_avg=[load_before, load_average()], threads=plan.threads, optimizer_state_bytes=optimizer)
    return result


def head_loss_ran(model) -> str | None:
    """The LM-head loss the segment resolved ``training.head_loss`` to (``chunked`` or ``fused``; None: no head)."""
    head = getattr(getattr(model, "module", model), "head", None)
    return getattr(head, "loss_kind", None)


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (AdamW's two moments)."""
    import torch

    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, torch.Tensor))


def measure(args: argparse.Namespace, plan_path: Path, save) -> list[dict[str, Any]]:
    """Every variant, each in a fresh process, ``repeats`` times interleaved; ``save(records)`` after each one (a
    run stopped by a time limit keeps what it measured)."""
    records = []
    for repeat in range(args.repeats):
        for name in args.variants.split(","):
            command = [sys.executable, str(Path(__file__).resolve()), "--run", str(plan_path), name]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")])),
                   CAP_ENV: str(args.cap_gib)}
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            lines = [line[len(PREFIX):] for line in done.stdout.splitlines() if line.startswith(PREFIX)]
            record = json.loads(lines[0]) if lines else {"variant": name, "error": done.stderr[-2000:],
                                                         "oom": "OutOfMemoryError" in done.stderr}
            record["repeat"] = repeat
            records.append(record)
            save(records)
            print(summary_line(record), flush=True)
    return records


def summary_line(record: dict[str, Any]) -> str:
    """One printed line per measured variant (or its error)."""
    if "error" in record:
        lines = record["error"].strip().splitlines()
        return f"{record['variant']:<12} {'OUT OF MEMORY' if record.get('oom') else 'ERROR'} {lines[-1] if lines else ''}"
    peak = record.get("tensor_peak_bytes") or record["peak_bytes"]
    return (f"{record['variant']:<12} {record['tokens_per_s']:>9,.0f} tok/s  peak {peak / 2**20:9.1f} MiB  "
            f"trainable {record['trainable_params'] / 1e6:6.2f} M  optimizer {record['optimizer_state_bytes'] / 2**20:6.1f} MiB"
            f"  load {record['load_avg'][0][0]:.2f}")


def best(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per variant, the repeat with the best (lowest) median step."""
    chosen: dict[str, dict[str, Any]] = {}
    for record in records:
        if "error" in record:
            continue
        kept = chosen.get(record["variant"])
        if kept is None or _time(record) < _time(kept):
            chosen[record["variant"]] = record
    return chosen


def _time(record: dict[str, Any]) -> float:
    """A record's time to compare repeats by: the median step (training), else the whole job's wall time."""
    return record.get("median_step_s") or record["wall_s"]


def main(argv: list[str] | None = None) -> None:
    """Prepare the run directory, measure every variant in a process of its own, write the JSON."""
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--run":  # the per-variant process
        plan = BenchPlan.load(argv[1])
        os.environ.setdefault(bench_setup.ENV_CACHE, plan.cache_dir)
        print(PREFIX + json.dumps(run_one(plan, argv[2])), flush=True)
        return
    args = parse_args(argv)
    out = Path(args.out or HERE / "results" / f"segment_bench.{args.shape}.{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/segment_bench.py " + " ".join(argv),
            "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "shape": args.shape,
            "seq": args.seq, "batch": args.batch, "steps": args.steps, "warmup": args.warmup, "prefix": args.prefix,
            "r": args.r, "threads": args.threads, "cap_gib": args.cap_gib or None, "head_loss": args.head_loss,
            "load_at_start": os.getloadavg()[0]}
    startup_counts = {shape: startups(*layout) for shape, layout in STARTUP_SHAPES.items()}

    def save(records: list[dict[str, Any]]) -> None:
        """Write what is measured so far."""
        meta["load_at_end"] = os.getloadavg()[0]
        out.write_text(json.dumps({"meta": meta, "startups": startup_counts, "best": best(records),
                                   "records": records}, indent=1))

    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="segment-bench-", dir=args.work_dir) as work:
        plan = bench_setup.prepare(bench_setup.make_plan(args, Path(work)))
        add_half_files(plan)
        meta["setup_s"] = plan.setup_s
        measure(args, Path(work) / "plan.json", save)
    print(f"ray train start-ups per run: {json.dumps(startup_counts)}\nwrote {out}")


if __name__ == "__main__":
    main()
