"""Tables, ratios and goal checks of the training-step benchmark (pure data in, data and text out)."""

from __future__ import annotations

from typing import Any

from bench_probes import variant_flops
from bench_setup import BenchPlan, shape_dict

MAIN_KINDS = ("e2e", "e2e_ac", "seg_snap", "seg_recompute", "lw_snap", "snap_write", "read_shards")
REFERENCE_NAME = {"snap_write": "snap_write_1layer_d2h"}
GOAL_RATIO, GOAL_WAIT, GOAL_DEPTH = 0.90, 0.05, 1.10
ADAMW_BYTES = 16  # fp32 weight + grad + two moments per trainable parameter


def best(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The repeat with the highest tokens/s of each (impl, variant), with every repeat's tokens/s kept."""
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        if "error" in record:
            continue
        key = (record["impl"], record["variant"])
        seen = chosen.get(key)
        runs = (seen or {}).get("tokens_per_s_repeats", []) + [record["tokens_per_s"]]
        if seen is None or record["tokens_per_s"] > seen["tokens_per_s"]:
            chosen[key] = dict(record)
        chosen[key]["tokens_per_s_repeats"] = runs
    return chosen


def peak_of(record: dict[str, Any] | None, device: str) -> int | None:
    """Comparable peak bytes: CUDA max allocated; on CPU the RSS high-water mark above the process baseline."""
    if record is None:
        return None
    if record["impl"] == "reference":
        if device == "cuda":
            return None if record.get("peak_gib") is None else int(record["peak_gib"] * 2**30)
        return record["process_peak_rss_bytes"] - record["baseline_rss_bytes"]
    return record["peak_bytes"] if device == "cuda" else record["peak_bytes"] - record["baseline_rss_bytes"]


def goal_peak_of(record: dict[str, Any] | None, device: str) -> int | None:
    """The peak the memory goal is judged on: CUDA max allocated; on CPU the tensor peak of the profiled step."""
    if record is None:
        return None
    return record.get("tensor_peak_bytes") or peak_of(record, device)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or not b else round(a / b, 3)


def build(plan: BenchPlan, records: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows, depth scaling, goals and the manifest check of one run."""
    chosen, device = best(records), plan.device
    rows = []
    for kind in MAIN_KINDS:
        mine = chosen.get(("project", kind))
        ref = chosen.get(("reference", REFERENCE_NAME.get(kind, kind)))
        if mine is None and ref is None:
            continue
        main = mine or ref
        flops = variant_flops(kind, shape_dict(plan.shape), plan.seq, plan.prefix, plan.r) if kind != "read_shards" else None
        rows.append({
            "variant": kind, "project_tokens_per_s": mine and mine["tokens_per_s"],
            "reference_tokens_per_s": ref and ref["tokens_per_s"],
            "ratio": _ratio(mine and mine["tokens_per_s"], ref and ref["tokens_per_s"]),
            "ratio_per_repeat": repeat_ratios(records, kind, REFERENCE_NAME.get(kind, kind)),
            "project_peak_bytes": peak_of(mine, device), "reference_peak_bytes": peak_of(ref, device),
            "project_tensor_peak_bytes": mine and mine.get("tensor_peak_bytes"),
            "trainable_params": main.get("trainable_params"), "flops_per_token": flops,
            "project_tflops": None if not (mine and flops) else round(flops * mine["tokens_per_s"] / 1e12, 4),
            "data_wait_share": mine and mine.get("data_wait_share"),
        })
    depth = depth_scaling(plan, chosen)
    report = {"rows": rows, "depth_scaling": depth, "manifest_check": manifest_check(chosen, device),
              "errors": [{"impl": r["impl"], "variant": r["variant"], "error": r["error"]} for r in records if "error" in r]}
    report["goals"] = goals(plan, chosen, depth, device)
    return report


def repeat_ratios(records: list[dict[str, Any]], variant: str, reference: str) -> list[float]:
    """project / reference tokens/s of each repeat (the two ran back to back)."""
    speed = {(r["impl"], r["variant"], r.get("repeat")): r["tokens_per_s"] for r in records if "error" not in r}
    repeats = sorted({r.get("repeat") for r in records})
    return [round(speed[("project", variant, i)] / speed[("reference", reference, i)], 3) for i in repeats
            if ("project", variant, i) in speed and ("reference", reference, i) in speed]


def depth_scaling(plan: BenchPlan, chosen: dict) -> list[dict[str, Any]]:
    """Stage-2 median step and iteration time at each prefix depth, with and without SnapCheck."""
    rows = []
    for p in plan.depth_points():
        suffix = "" if p == plan.prefix else f"@p{p}"
        row: dict[str, Any] = {"prefix": p, "q": p + 1}
        for impl in ("project", "reference"):
            for kind in ("seg_snap", "seg_recompute"):
                record = chosen.get((impl, kind + suffix))
                row[f"{impl}_{kind}_step_s"] = record and record["median_step_s"]
                if impl == "project":
                    row[f"project_{kind}_iteration_s"] = record and record.get("iteration_s")
        rows.append(row)
    return rows


def goals(plan: BenchPlan, chosen: dict, depth: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """The four goals of issue 7, each with its measured value (None where not measured)."""
    seg, ref = chosen.get(("project", "seg_snap")), chosen.get(("reference", "seg_snap"))
    e2e = chosen.get(("project", "e2e"))
    out = []
    ratio = _ratio(seg and seg["tokens_per_s"], ref and ref["tokens_per_s"])
    out.append({"goal": "seg_snap tokens/s >= 90% of the reference seg_snap", "value": ratio,
                "met": None if ratio is None else ratio >= GOAL_RATIO})
    shard_fed = [r for (impl, name), r in chosen.items()
                 if impl == "project" and r["kind"] in ("seg_snap", "lw_snap")]
    wait = max((r["data_wait_share"] for r in shard_fed), default=None)
    out.append({"goal": "time waiting on shard reads < 5% of step time (worst stage-2 row)", "value": wait,
                "met": None if wait is None else wait < GOAL_WAIT})
    if seg is not None:
        peak, budget = goal_peak_of(seg, device), seg["budget_bytes"]
        measure = ("CUDA max allocated" if device == "cuda" else "CPU tensor peak of one step (profiler)"
                   if seg.get("tensor_peak_bytes") else "CPU RSS high-water (no profiled step recorded)")
        out.append({"goal": "seg_snap peak <= trained params + AdamW state + one micro-batch's activations",
                    "value": _ratio(peak, budget), "peak_bytes": peak, "peak_measure": measure,
                    "budget_bytes": budget, "weights_grads_adam_bytes": ADAMW_BYTES * seg["trainable_params"],
                    "activation_bytes": seg["activation_bytes"], "e2e_peak_bytes": goal_peak_of(e2e, device),
                    "rss_peak_bytes": peak_of(seg, device) if device == "cpu" else None,
                    "seg_over_e2e": _ratio(peak, goal_peak_of(e2e, device)), "met": peak <= budget})
    ends = [row for row in depth if row["prefix"] in (1, plan.deep)]
    if len(ends) == 2 and ends[0]["project_seg_snap_step_s"] and ends[1]["project_seg_snap_step_s"]:
        growth = _ratio(ends[1]["project_seg_snap_step_s"], ends[0]["project_seg_snap_step_s"])
        out.append({"goal": f"seg_snap step at p={plan.deep} within 10% of p=1", "value": growth,
                    "iteration_ratio": _ratio(ends[1]["project_seg_snap_iteration_s"],
                                              ends[0]["project_seg_snap_iteration_s"]),
                    "recompute_ratio": _ratio(ends[1]["project_seg_recompute_step_s"],
                                              ends[0]["project_seg_recompute_step_s"]),
                    "met": growth <= GOAL_DEPTH})
    return out


def manifest_check(chosen: dict, device: str) -> list[dict[str, Any]]:
    """``SegmentRun.metrics()`` (what the manifest records per layer) next to this benchmark's numbers."""
    rows = []
    for (impl, name), record in sorted(chosen.items()):
        metrics = record.get("manifest_metrics")
        if impl != "project" or not metrics:
            continue
        rows.append({
            "variant": name, "stage": record.get("stage"),
            "tokens_match": metrics["tokens"] == record["tokens"],
            "trainable_params_match": metrics["trainable_params"] == record["trainable_params"],
            "manifest_tokens_per_s": metrics["tokens_per_s"], "bench_tokens_per_s": record["tokens_per_s"],
            "tokens_per_s_ratio": _ratio(metrics["tokens_per_s"], record["tokens_per_s"]),
            "manifest_wall_s": metrics["wall_s"], "eval_s_in_wall": record["eval_s"],
            "build_s_not_in_wall": record.get("build_s"),
            "manifest_data_wait_share": metrics["data_wait_share"], "bench_data_wait_share": record["data_wait_share"],
            "manifest_peak_bytes": metrics["peak_memory_bytes"], "bench_peak_bytes": record["peak_bytes"],
        })
    return rows


# -- text ----------------------------------------------------------------------------------------
def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and digits:
        return f"{value:,.{digits}f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def _mib(value: int | None) -> str:
    return "-" if value is None else (f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)] if rows else [len(h) for h in header]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def render(report: dict[str, Any]) -> str:
    main = _table(
        ["variant", "project tok/s", "reference tok/s", "ratio", "per repeat", "project peak", "ref peak",
         "tensor peak", "trainable", "FLOP/token", "proj TFLOP/s", "wait share"],
        [[r["variant"], _num(r["project_tokens_per_s"]), _num(r["reference_tokens_per_s"]), _num(r["ratio"], 3),
          " ".join(f"{x:.2f}" for x in r["ratio_per_repeat"]) if len(r["ratio_per_repeat"]) > 1 else "-",
          _mib(r["project_peak_bytes"]), _mib(r["reference_peak_bytes"]), _mib(r.get("project_tensor_peak_bytes")),
          _num(r["trainable_params"]),
          f"{r['flops_per_token'] / 1e6:,.1f} M" if r["flops_per_token"] else "-", _num(r["project_tflops"], 4),
          _num(r["data_wait_share"], 4)] for r in report["rows"]])
    depth = _table(
        ["p", "seg_snap step s", "iteration s", "seg_recompute step s", "iteration s", "ref seg_snap", "ref recompute"],
        [[str(r["prefix"]), _num(r["project_seg_snap_step_s"], 4), _num(r["project_seg_snap_iteration_s"], 2),
          _num(r["project_seg_recompute_step_s"], 4), _num(r["project_seg_recompute_iteration_s"], 2),
          _num(r["reference_seg_snap_step_s"], 4), _num(r["reference_seg_recompute_step_s"], 4)]
         for r in report["depth_scaling"]])
    goals = "\n".join(f"  [{'met' if g['met'] else ('MISSED' if g['met'] is False else 'n/a')}] {g['goal']}: "
                      f"{_num(g['value'], 3)}" + _memory_detail(g) for g in report["goals"])
    manifest = _table(
        ["variant", "tokens ok", "manifest tok/s", "bench tok/s", "ratio", "eval s in wall", "manifest wait",
         "bench wait", "manifest peak"],
        [[m["variant"], str(m["tokens_match"] and m["trainable_params_match"]), _num(m["manifest_tokens_per_s"]),
          _num(m["bench_tokens_per_s"]), _num(m["tokens_per_s_ratio"], 3), _num(m["eval_s_in_wall"], 3),
          _num(m["manifest_data_wait_share"], 4), _num(m["bench_data_wait_share"], 4), _mib(m["manifest_peak_bytes"])]
         for m in report["manifest_check"]])
    errors = "".join(f"\nFAILED {e['impl']} {e['variant']}: {e['error'][-500:].strip()}" for e in report["errors"])
    return (f"{errors}\nTraining steps (median step; peaks: CUDA max allocated, CPU RSS high-water above the process "
            f"baseline; tensor peak: CPU tensors alive at one step's start + its highest net allocation)\n{main}\n\nDepth scaling (Stage 2, q = p+1)\n{depth}\n\nGoals\n{goals}\n\n"
            f"Manifest metrics (SegmentRun.metrics) vs this benchmark\n{manifest}\n")


def _memory_detail(goal: dict[str, Any]) -> str:
    if "budget_bytes" not in goal:
        return ""
    return (f" ({goal['peak_measure']} {_mib(goal['peak_bytes'])} vs budget {_mib(goal['budget_bytes'])}: "
            f"{_mib(goal['weights_grads_adam_bytes'])} weights+grads+AdamW, {_mib(goal['activation_bytes'])} saved "
            f"activations; {_num(goal['seg_over_e2e'], 3)} of E2E)")


def progress_line(record: dict[str, Any]) -> str:
    if "error" in record:
        return f"  {record['impl']:9s} {record['variant']:24s} FAILED: {record['error'][-300:].strip()}"
    step = record.get("median_step_s")
    return (f"  {record['impl']:9s} {record['variant']:24s} {record['tokens_per_s']:>12,.0f} tok/s"
            + (f"  median step {step:.4f} s" if step else ""))
