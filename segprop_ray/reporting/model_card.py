"""A model card (README.md) for an exported exit: what the model is, how it was trained, how it scores."""

from __future__ import annotations

import os
import re
from typing import Any

from segprop_ray.core.plan import MODES
from segprop_ray.reporting.export import choose_depth, export_model, open_run
from segprop_ray.reporting.report_text import fmt, markdown_table
from segprop_ray.storage.manifest import Manifest

CARD_METRICS = [("eval_loss", "held-out loss"), ("perplexity", "perplexity"), ("accuracy", "multiple-choice accuracy"),
                ("accuracy_norm", "accuracy, length-normalised"), ("train_loss", "last train loss"),
                ("nhsic_input", "nHSIC(X; Z) after the exit layer"), ("nhsic_label", "nHSIC(Y; Z) after the exit layer")]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def kept_layers(manifest: Manifest, depth: int) -> list[int]:
    """Original indices of the decoder layers the exit at ``depth`` keeps: 0..depth, then LL's last r."""
    plan = manifest.plan()
    return plan.exit_layers(depth)


def _front_matter(manifest: Manifest) -> str:
    lines = ["---", "library_name: transformers", "tags:", "- segprop", "- layer-wise-training", "- early-exit"]
    uri = manifest.model.uri
    if _HUB_ID.match(uri) and not os.path.exists(uri):  # the hub's base_model field takes hub ids only
        lines.append(f"base_model: {uri}")
    return "\n".join([*lines, "---"])


SHORT_NAMES = {mode: spec.name for mode, spec in MODES.items()}
END_TO_END_METHODS = {"e2e": "end-to-end fine-tuning (e2e: every layer at once, the baseline SegProp is compared with)",
                      "lora": "end-to-end LoRA fine-tuning (lora: adapters on every layer at once, merged into the "
                              "weights; the LoRA baseline SegProp is compared with)"}


def _summary(manifest: Manifest, depth: int, layers: list[int]) -> str:
    base = f"A causal language model of {len(layers)} decoder layers, fine-tuned from `{manifest.model.uri}` by "
    if MODES[manifest.mode].end_to_end:
        return base + f"{SHORT_NAMES[manifest.mode]} (every layer kept). It is a standard Hugging Face checkpoint."
    return (base + f"{SHORT_NAMES.get(manifest.mode, manifest.mode)}: the exit after layer {depth}, made of the "
            f"original layers {_ranges(layers)}, the final norm and the LM head. It is a standard Hugging Face "
            "checkpoint; nothing special is needed to load it.")


def _method(manifest: Manifest) -> str:
    if MODES[manifest.mode].end_to_end:
        return END_TO_END_METHODS.get(manifest.mode, SHORT_NAMES[manifest.mode]) + _adapter_text(manifest)
    name = SHORT_NAMES.get(manifest.mode, manifest.mode)
    r = " (lw: r = 0, no last layers)" if manifest.mode == "lw" else ""
    last = "" if manifest.mode == "lw" else f", last layers r = {manifest.last_layers}"
    return f"{name}{r}, base depth p = {manifest.base_depth}{last}{_segments_text(manifest)}{_adapter_text(manifest)}"


def _segments_text(manifest: Manifest) -> str:
    """How Stage 2 cut the middle layers, when not one whole layer per iteration."""
    if manifest.granularity == "sublayer":
        return "; Stage 2 trained each middle layer in two iterations, its attention half then its MLP half"
    if manifest.segment_layers > 1:
        return f"; Stage 2 trained segments of {manifest.segment_layers} consecutive middle layers at a time"
    return ""


def _adapter_text(manifest: Manifest) -> str:
    """The LoRA adapter the run trained, merged into the saved weights."""
    adapter = manifest.adapter
    if adapter is None:
        return ""
    targets = ", ".join(adapter["target_modules"]) if isinstance(adapter.get("target_modules"), list) else (
        adapter.get("target_modules") or "PEFT's default modules")
    return (f"; LoRA adapters (r = {adapter['r']}, alpha = {adapter['alpha']:g}, dropout = {adapter['dropout']:g}, "
            f"on {targets}) trained instead of full weights and merged into them: the checkpoint holds plain weights")


def _decision_text(manifest: Manifest, depth: int) -> str:
    decision = next((d for d in manifest.decisions if d.get("depth") == depth), None)
    if decision is None:
        return f"No global exit decision was recorded after depth {depth}."
    verdict = "kept adding depth" if decision.get("continue_training") else "stopped adding depth"
    return f"After depth {depth} the run {verdict} ({decision.get('reason')}): {decision.get('detail', '')}."


def _metrics_table(manifest: Manifest, depth: int, metrics: dict[str, Any]) -> str:
    baseline = manifest.baseline or {}
    rows = [[title, fmt(key, metrics[key]), fmt(key, baseline.get(key))] for key, title in CARD_METRICS
            if metrics.get(key) is not None]
    if not rows:
        return "No evaluation was recorded for this exit."
    return markdown_table(["metric", f"exit {depth}", "original model"], rows)


def model_card(manifest: Manifest, depth: int, metrics: dict[str, Any] | None = None) -> str:
    """README.md text for the model exported at ``depth``: layers kept, base model, method, scores, exit decision.

    ``metrics`` (e.g. from an evaluation at export time) are shown over the ones in the manifest.
    """
    record = manifest.layer(depth)
    if record is None:
        raise ValueError(f"the run has no record of depth {depth}")
    scores = {"eval_loss": record.eval_loss, "perplexity": record.perplexity, "train_loss": record.train_loss,
              **record.metrics, **(metrics or {})}
    layers = kept_layers(manifest, depth)
    n = manifest.model.num_layers
    final = f"the run's final model is exit {manifest.final_depth}" if manifest.final_depth is not None else "the run has not finished"
    facts = [("base model", f"`{manifest.model.uri}` ({manifest.model.architecture}, {n} decoder layers)"),
             ("training", _method(manifest)), ("exit depth", f"{depth} ({final})"),
             ("decoder layers kept", f"{len(layers)} of {n}: original layers {_ranges(layers)}"),
             ("iteration", f"{record.stage}, {record.steps} steps, stopped by {(record.decision or {}).get('reason', '-')}"
                           + _kept_text(record)),
             *_embedding_fact(manifest, record.stage),
             ("run", f"`{manifest.run_id}`")]
    usage = ("```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
             "model = AutoModelForCausalLM.from_pretrained(\"PATH/TO/THIS/DIRECTORY\")\n"
             "tokenizer = AutoTokenizer.from_pretrained(\"PATH/TO/THIS/DIRECTORY\")\n```")
    return "\n\n".join([
        _front_matter(manifest),
        f"# {manifest.model.uri.rstrip('/').rsplit('/', 1)[-1]}, exit {depth} ({manifest.mode})",
        _summary(manifest, depth, layers),
        "## Model\n\n" + "\n".join(f"- **{name}**: {value}" for name, value in facts),
        "## Evaluation at this depth\n\n" + _metrics_table(manifest, depth, scores),
        "## Global exit decision\n\n" + _decision_text(manifest, depth),
        "## Usage\n\n" + usage,
    ]) + "\n"


def _kept_text(record: Any) -> str:
    """``; weights of step 40 kept (best evaluation)`` when the committed step is not the last one."""
    if record.kept_step is None or record.kept_step == record.steps:
        return ""
    return f"; weights of step {record.kept_step} kept (its best evaluation)"


def _embedding_fact(manifest: Manifest, stage: str) -> list[tuple[str, str]]:
    """Whether the exit's LM head is tied to its input embedding, for a model that had them tied."""
    if not manifest.model.tied_embeddings:
        return []
    if manifest.adapter is not None:
        return [("embeddings", "tied, as in the base model: LoRA left the LM head and the input embedding frozen")]
    if stage == "stage2":
        return [("embeddings", "untied: the base model ties its LM head to the input embedding; this exit's head was "
                               "trained in Stage 2 while the embedding stayed frozen, so it is saved as its own tensor")]
    return [("embeddings", "tied, as in the base model: LM head and input embedding trained as one tensor")]


def _ranges(indices: list[int]) -> str:
    """``[0, 1, 2, 6, 7]`` -> ``0-2, 6-7``."""
    spans: list[list[int]] = []
    for index in indices:
        if spans and index == spans[-1][1] + 1:
            spans[-1][1] = index
        else:
            spans.append([index, index])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def export_with_card(run_dir: str, out: str, depth: str | int | None = None,
                     storage_options: dict[str, Any] | None = None, **options: Any) -> tuple[int, str]:
    """Export the exit at ``depth`` (a depth, ``best`` or ``final``) to ``out`` with its model card as README.md
    (``options``: :func:`~segprop_ray.reporting.export.export_model`'s ``model_source`` and ``memory_budget``)."""
    _, manifest = open_run(run_dir, storage_options)
    chosen = choose_depth(manifest, depth)
    card = model_card(manifest, chosen)
    return export_model(run_dir, out, chosen, storage_options, extra_files={"README.md": card}, **options)
