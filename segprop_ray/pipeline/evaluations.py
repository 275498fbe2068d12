"""The driver's bookkeeping of exit evaluations running beside training (see :mod:`exit_eval`)."""

from __future__ import annotations

from typing import Any

import ray

from segprop_ray.core.training import perplexity
from segprop_ray.pipeline import exit_eval
from segprop_ray.storage.manifest import Manifest

BASELINE = -1


class Evaluations:
    """Starts an evaluation task per committed exit, collects finished ones into the manifest."""

    def __init__(self, driver: Any):
        self.driver = driver
        self.pending: dict[int, ray.ObjectRef] = {}

    @property
    def enabled(self) -> bool:
        """Whether there is anything beyond the training's own eval loss to measure."""
        evaluation = self.driver.cfg.evaluation
        return bool(evaluation.mc_path or evaluation.nhsic_tokens)

    def start_baseline(self) -> None:
        """Score the input model itself, once per run."""
        if self.driver.cfg.evaluation.baseline and self.driver.manifest.baseline is None:
            self._launch(BASELINE)

    def start(self, depth: int) -> None:
        """Score exit ``depth`` unless it already has its evaluation."""
        record = self.driver.manifest.layer(depth)
        if self.enabled and record is not None and "evaluated" not in record.metrics:
            self._launch(depth)

    def _launch(self, depth: int) -> None:
        hash_of = self.driver._hash_of
        ctx = self.driver._context(depth, input_hash=hash_of(None))
        self.pending[depth] = exit_eval.launch(ctx)

    def collect(self) -> None:
        """Wait for the started evaluations and record their results (an error is recorded, not raised)."""
        for depth, ref in sorted(self.pending.items()):
            try:
                result, error = ray.get(ref), None
            except Exception as failure:  # noqa: BLE001 - a failed evaluation must not stop training
                result, error = {}, f"{type(failure).__name__}: {str(failure).strip().splitlines()[-1]}"
                self.driver.echo(f"evaluation of {'the input model' if depth == BASELINE else f'exit {depth}'} failed: {error}")
            self.driver._save(lambda m, d=depth, r=result, e=error: _record(m, d, r, e))
        self.pending.clear()


def _record(manifest: Manifest, depth: int, result: dict[str, Any], error: str | None) -> None:
    result = dict(result)
    if error:
        result["evaluation_error"] = error
    if depth == BASELINE:
        manifest.baseline = {**result, "perplexity": perplexity(result.get("eval_loss"))}
        return
    manifest.layer(depth).metrics.update({**result, "evaluated": error is None})
