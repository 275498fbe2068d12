"""Before any expensive work: check the config against the model, the data and the run directory,
then open the run (or create it). Every problem is one line naming it; nothing written is lost.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from segprop_ray.config import Config, RunConflict, config_to_yaml
from segprop_ray.config.schema import SNAPCHECK_IO_FIELDS
from segprop_ray.core.hf_compat import check_transformers_version
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import SegPropPlan
from segprop_ray.core.self_check import check_model_family
from segprop_ray.storage.fs import cache_root, check_writable
from segprop_ray.pipeline.data_checks import check_data
from segprop_ray.pipeline.plan_checks import check_devices, check_segments
from segprop_ray.pipeline.stage_job import staged_source
from segprop_ray.storage.inputs import expand_inputs, read_chat_template
from segprop_ray.storage.layout import RunLayout
from segprop_ray.storage.lease import RunLease
from segprop_ray.storage.manifest import Manifest, ManifestStore, ModelInfo
from segprop_ray.storage.models import model_config_dir
from segprop_ray.storage.shard_format import ShardSpec

WHERE_NOT_WHAT = {"run_dir", "storage_options", "resources", "device", "evaluation"}
"""Config sections that say where and how a run executes, not what it computes: changing them continues the run."""
HOW_NOT_WHAT = {"loss_chunk_tokens", "head_loss"}
"""Training settings of the same kind (memory against speed; only float rounding differs): lowering the loss
chunk after an out-of-memory error, or switching between the chunked and the fused head loss, continues the run."""


@dataclass
class RunSetup:
    """Everything the driver derives once at start."""

    layout: RunLayout
    manifest: Manifest
    plan: SegPropPlan
    spec: ShardSpec
    tokens_hash: str
    model_info: ModelInfo
    lease: RunLease
    """This driver's lease on the run directory (renewed in the background until released)."""


def semantic_config(cfg: Config) -> dict[str, Any]:
    """The settings that decide what the run computes."""
    data = cfg.model_dump(mode="json", exclude=WHERE_NOT_WHAT)
    data["data"] = data_identity(cfg)
    for section in ("training", "stage1"):
        data[section] = {k: v for k, v in data[section].items() if k not in HOW_NOT_WHAT}
    data["snapcheck"] = {k: v for k, v in data["snapcheck"].items() if k not in SNAPCHECK_IO_FIELDS}
    return data


def data_identity(cfg: Config) -> dict[str, Any]:
    """The ``data`` settings as they decide the tokens: with ``chat_template_sha256``, the template file's contents,
    beside its path, so an edited template is other tokens (and another run) though its path stays."""
    data = cfg.data.model_dump(mode="json")
    if cfg.data.chat_template:
        text = read_chat_template(cfg.data.chat_template, cfg.storage_options)
        data["chat_template_sha256"] = hashlib.sha256(text.encode()).hexdigest()
    return data


def tokens_digest(cfg: Config, spec: ShardSpec) -> str:
    """The identity of the token shards: the data settings (template contents included), the model (its tokenizer)
    and the shard geometry."""
    return digest({"data": data_identity(cfg), "model": cfg.model, "spec": spec.to_dict()})


def digest(data: Any) -> str:
    """sha256 of a JSON-able value (key order independent)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def inspect_model(cfg: Config, model_source: str = "") -> tuple[ModelInfo, ModelParts]:
    """The input model's facts (one-line errors for a missing or unsupported model, or segment settings it cannot
    take), read from ``model_source`` (the run's staged copy) when given, else from the config's ``model``."""
    from transformers import AutoConfig

    check_transformers_version()
    hf_config = AutoConfig.from_pretrained(model_config_dir(model_source or cfg.model, cfg.storage_options))
    parts = ModelParts(hf_config)
    check_model_family(hf_config, cache_root())  # exact on a small random copy, or refused here in one line
    arch = (getattr(hf_config, "architectures", None) or [type(parts.skeleton).__name__])[0]
    cfg.check_against_model(parts.num_layers)
    plan = SegPropPlan.from_config(cfg.segprop, parts.num_layers)
    check_segments(cfg, parts, plan)
    info = ModelInfo(uri=cfg.model, architecture=arch, family=parts.layout.family, num_layers=parts.num_layers,
                     hidden_size=hf_config.hidden_size, vocab_size=hf_config.vocab_size, tied_embeddings=parts.tied,
                     untied=parts.tied and not plan.spec.end_to_end and plan.trains_head)
    return info, parts


def prepare_run(cfg: Config, restart: bool = False) -> RunSetup:
    """Validate, take the run directory's driver lease (refused while another driver holds it), then open or
    create the run in ``cfg.run_dir``. Once the model is staged there, the staged copy is what is read (its
    config and tokenizer), never its origin again."""
    check_devices(cfg)
    check_writable(cfg.run_dir, cfg.storage_options)
    layout = RunLayout.open(cfg.run_dir, cfg.storage_options)
    check_inputs(cfg, staged_source(cfg, layout))
    lease = RunLease(layout, cfg.resources.driver_lease_s)
    try:  # taken inside: a SIGTERM right after taking it still releases it
        lease.acquire()
        return _open_run(cfg, layout, lease.start_renewing(), restart)
    except BaseException:
        lease.release()
        raise


def _open_run(cfg: Config, layout: RunLayout, lease: RunLease, restart: bool) -> RunSetup:
    _check_conflict(cfg, layout, restart)
    info, parts = inspect_model(cfg, staged_source(cfg, layout))  # the config only: weights are fetched where they are used
    snap = cfg.snapcheck
    spec = ShardSpec.for_snapcheck(cfg.data.seq_len, info.hidden_size, snap.dtype, snap.rows_per_group,
                                   snap.groups_per_file, snap.compression)
    plan = SegPropPlan.from_config(cfg.segprop, info.num_layers)
    manifest = _open_manifest(cfg, layout, info, plan, spec, restart)
    tokens_hash = tokens_digest(cfg, spec)
    return RunSetup(layout, manifest, plan, spec, tokens_hash, info, lease)


def check_inputs(cfg: Config, model_source: str = "") -> None:
    """Every input file setting names at least one file, and the data's records hold what its format needs (the
    tokenizer read from ``model_source``, the staged copy, when given)."""
    check_data(cfg, model_source)
    for setting, value in (("evaluation.mc_path", cfg.evaluation.mc_path),
                           ("evaluation.mc_dev_path", cfg.evaluation.mc_dev_path)):
        if value is not None:
            expand_inputs(value, cfg.storage_options, setting)


def config_conflict(cfg: Config, existing: Manifest) -> list[str] | None:
    """The settings in which ``cfg`` differs from the run ``existing`` holds; None when it is the same run."""
    semantic = semantic_config(cfg)
    if existing.config_hash == digest(semantic):
        return None
    return _changed_keys(existing.config, semantic) or ["unknown keys"]


def _check_conflict(cfg: Config, layout: RunLayout, restart: bool) -> None:
    """Refuse a run directory that holds a run of another config, unless restarting."""
    existing = ManifestStore(layout).read()
    changed = config_conflict(cfg, existing) if existing is not None and not restart else None
    if changed:
        raise RunConflict(f"run directory {layout.describe()} holds another run (config differs in: "
                          f"{', '.join(changed)}); pass --restart to start over there, "
                          f"or choose another run_dir")


def _open_manifest(cfg: Config, layout: RunLayout, info: ModelInfo, plan: SegPropPlan, spec: ShardSpec,
                   restart: bool) -> Manifest:
    store = ManifestStore(layout)
    existing = store.read()
    semantic = semantic_config(cfg)
    config_hash = digest(semantic)
    if existing is not None and existing.config_hash == config_hash and not restart:
        return existing
    if existing is not None:  # restarting (another config was refused by _check_conflict)
        _wipe(layout)
    manifest = Manifest(run_id=f"{plan.mode}-{config_hash[:10]}", config_hash=config_hash, config=semantic,
                        mode=plan.mode, base_depth=plan.base_depth, last_layers=plan.last_layers,
                        segment_layers=plan.segment_layers, granularity=plan.granularity,
                        adapter=asdict(plan.adapter) if plan.adapter is not None else None, model=info,
                        group_size=spec.group_size)
    store.write(manifest)
    layout.fs.pipe_file(layout.config_resolved, config_to_yaml(cfg).encode())
    return manifest


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def _wipe(layout: RunLayout) -> None:
    """Start over: the manifest goes first, so a crash mid-wipe leaves a directory seen as new."""
    fs = layout.fs
    fs.rm_file(layout.manifest)
    for name in ("config.resolved.yaml", "model", "tokens", "snapshots", "layers", "exits", "checkpoints", "export",
                 "report"):
        path = layout.join(name)
        if fs.exists(path):
            fs.rm(path, recursive=True)
