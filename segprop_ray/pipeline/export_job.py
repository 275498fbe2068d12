"""The export as a Ray task on a worker: the head only starts it and records where it wrote.

The task streams the exit shard by shard (:func:`segprop_ray.reporting.export.export_model`): it holds
about one decoder layer (or the embedding / the head) in memory, reserves ``resources.export.memory_gb``
and runs on the nodes of ``resources.export.label_selector``, so a 7B export never lands on the head's
few GiB after all the GPU work is done. A task lost with its node is retried by Ray.
"""

from __future__ import annotations

import resource
from typing import Any

import ray

from segprop_ray.config.placement import GIB
from segprop_ray.pipeline.context import JobContext
from segprop_ray.reporting.model_card import export_with_card


def export_task(job: dict[str, Any], depth: int, out: str) -> dict[str, Any]:
    """Export exit ``depth`` of the job's run to ``out`` with its model card; returns where and how it ran."""
    ctx = JobContext(**job)
    cfg = ctx.cfg
    budget = int(cfg.resources.export.memory_gb * GIB) if cfg.resources.export.memory_gb else None
    export_with_card(cfg.run_dir, out, depth, cfg.storage_options, model_source=ctx.model_source or None,
                     memory_budget=budget)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB, the worker process's high-water
    return {"uri": out, "node_id": ray.get_runtime_context().get_node_id(), "peak_rss_bytes": peak_kib * 1024}


def run_export(ctx: JobContext, depth: int, out: str) -> dict[str, Any]:
    """Run :func:`export_task` with the config's export resources and wait for it."""
    options = ctx.cfg.resources.export.ray_options()
    return ray.get(ray.remote(export_task).options(**options, max_retries=2).remote(ctx.to_dict(), depth, out))
