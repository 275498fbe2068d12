"""Where the head-side and CPU-side work of a run is placed on a cluster, and the driver's own settings.

The GPU jobs (snapshot actors, trainers) have their resources in :mod:`segprop_ray.config.schema`;
these sections cover what runs beside them: the CPU work kept off the GPU nodes, the export task,
and how a driver holds its run directory.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from segprop_ray.config.training import Strict

GIB = 1 << 30


def task_options(num_cpus: float, label_selector: dict[str, str], memory_gb: float | None = None,
                 fallback: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """Ray's options for one task or actor: CPUs, then memory, node labels and fallback labels when set."""
    options: dict[str, Any] = {"num_cpus": num_cpus}
    if memory_gb:
        options["memory"] = int(memory_gb * GIB)
    if label_selector:
        options["label_selector"] = dict(label_selector)
    if fallback:
        options["fallback_strategy"] = [{"label_selector": dict(selector)} for selector in fallback]
    return options


class CpuWorkResources(Strict):
    """CPU work kept off the GPU nodes: the tokenize job (its Ray Data reads and tokenizer actors), the
    checks of committed shard files on a resumed run, and staging the input model into the run directory."""

    num_cpus: float = Field(1, gt=0)
    """CPUs per check or staging task (the tokenizer actors take ``resources.tokenize_cpus``)."""
    label_selector: dict[str, str] = {}
    """Ray node labels of the CPU group, e.g. ``{"segprop/pool": "cpu"}`` (empty: any node)."""

    def ray_options(self) -> dict[str, Any]:
        """Ray's options for one check or staging task."""
        return task_options(self.num_cpus, self.label_selector)


class ExportResources(Strict):
    """The export task: writes the final model as sharded safetensors, one layer in memory at a time."""

    num_cpus: float = Field(1, gt=0)
    """CPUs of the export task."""
    memory_gb: float | None = Field(None, gt=0)
    """Memory Ray reserves for the export task, in GiB (None: none reserved). The export holds about one
    decoder layer plus the embedding or LM head at a time, not the model: a few GiB at 7B in bf16."""
    label_selector: dict[str, str] = {}
    """Ray node labels the export task must run on, e.g. ``{"segprop/pool": "cpu"}`` (empty: any node)."""

    def ray_options(self) -> dict[str, Any]:
        """Ray's options for the export task."""
        return task_options(self.num_cpus, self.label_selector, self.memory_gb)


StageModel = Literal["auto", "always", "never"]
