"""Staging the input model into the run directory once, as a Ray task on the CPU group.

With a remote run directory (``resources.stage_model: auto``), the first step copies the model's
config, tokenizer and safetensors files into ``<run_dir>/model/`` (:mod:`segprop_ray.storage.model_stage`);
every job then reads the model (weights, config and tokenizer) from there into its node's cache instead
of each GPU pod downloading it from the Hub, and never reads the origin again: a hub model is pinned to the
commit it was staged at. The copy runs on a worker of ``resources.cpu``, so the head only waits for it; a
copy already complete for the same model (a resumed run) is kept.
"""

from __future__ import annotations

from typing import Any

import ray

from segprop_ray.config import Config
from segprop_ray.storage.errors import StorageError
from segprop_ray.storage.fs import redact_uri, split_protocol
from segprop_ray.storage.gguf import is_gguf
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.manifest import Manifest
from segprop_ray.storage.model_stage import stage_model, staged_copy
from segprop_ray.storage.models import CONFIG_FILE_PATTERNS, resolve_model_dir

STEP = "stage_model"


def wants_staging(cfg: Config) -> bool:
    """``resources.stage_model``: ``always``, ``never``, or (``auto``) whenever the run directory is not local or the
    model is a GGUF file."""
    mode = cfg.resources.stage_model
    if is_gguf(cfg.model):  # a GGUF file is converted once, and every job reads the converted copy
        return mode != "never"
    return mode == "always" or (mode == "auto" and split_protocol(cfg.run_dir)[0] != "file")


def model_source(manifest: Manifest) -> str:
    """Where jobs read the model: the staged copy's URI once staged, else "" (the config's ``model``)."""
    step = manifest.steps.get(STEP)
    return str(step.outputs.get("uri", "")) if step is not None and step.status == "done" else ""


def staged_source(cfg: Config, layout: RunLayout) -> str:
    """The staged copy's URI when the run stages its model and a complete copy of it is in the run directory, else
    "" (before staging, the origin is read: it must be readable to be staged)."""
    if not wants_staging(cfg):
        return ""
    body = staged_copy(layout, cfg.model)
    return str(body["uri"]) if body is not None else ""


def stage_task(model: str, layout: RunLayout, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Ray task: stage ``model`` into the run directory; returns the staged copy's marker."""
    return stage_model(model, layout, storage_options)


def ensure_staged(driver: Any) -> None:
    """The driver's staging step: skipped when not wanted or when a complete copy of the model is there."""
    cfg, layout = driver.cfg, driver.setup.layout
    if not wants_staging(cfg) or (model_source(driver.manifest) and staged_copy(layout, cfg.model) is not None):
        return
    driver.echo("staging the input model into the run directory (once)")
    started = driver._start_step(STEP)
    task = ray.remote(stage_task).options(**cfg.resources.cpu.ray_options(), max_retries=2)
    body = ray.get(task.remote(cfg.model, layout, cfg.storage_options))
    check_same_model(driver.setup.model_info, body["uri"], cfg.storage_options)
    driver._finish_step(STEP, started, {"uri": body["uri"], "files": len(body["files"]), "bytes": body["bytes"],
                                        "revision": body.get("revision"), "identity": body.get("identity")})


def check_same_model(info: Any, uri: str, storage_options: dict[str, Any]) -> None:
    """Refuse in one line a staged copy whose shape differs from the model the run was planned on (its origin
    changed between the head reading its config and the staging)."""
    from transformers import AutoConfig

    staged = AutoConfig.from_pretrained(resolve_model_dir(uri, storage_options, patterns=CONFIG_FILE_PATTERNS))
    seen = (staged.num_hidden_layers, staged.hidden_size, staged.vocab_size)
    if seen != (info.num_layers, info.hidden_size, info.vocab_size):
        raise StorageError(f"model {redact_uri(info.uri)} changed at its origin while the run started (layers, hidden "
                           f"size, vocabulary {seen} staged, {(info.num_layers, info.hidden_size, info.vocab_size)} "
                           "planned): run the same command again")
