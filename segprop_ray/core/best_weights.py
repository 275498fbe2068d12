"""The weights of a segment's best evaluation, kept to be put back when it stops (HF's ``load_best_model_at_end``).

HF's Trainer, with ``load_best_model_at_end`` and the eval loss as ``metric_for_best_model``, ends
training with the checkpoint of the lowest eval loss among its evaluations. Here the candidates are
the evaluations at steps > 0 (the step-0 evaluation only anchors the exit rule, as HF never
evaluates before training); ties keep the earlier step. The copy is a full (unsharded) CPU state
dict, so it is saved in every checkpoint and a resumed iteration keeps the best so far.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

FULL = StateDictOptions(full_state_dict=True, ignore_frozen_params=True)
"""Gather full tensors of the trainable parameters on every rank (the copy is moved to CPU memory right after)."""


class BestWeights:
    """Tracks the best evaluation of a loop (its ``{"step", "eval_loss"}`` record lives in the loop state)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.tensors: dict[str, torch.Tensor] | None = None

    def offer(self, model: nn.Module, best: dict[str, Any] | None, step: int, eval_loss: float) -> dict[str, Any] | None:
        """The new best record if ``eval_loss`` at ``step`` beats ``best`` (the weights are copied), else ``best``.

        Every rank calls it at the same steps: gathering a sharded model is a collective.
        """
        if not self.enabled or step <= 0 or (best is not None and eval_loss >= best["eval_loss"]):
            return best
        state = get_model_state_dict(model, options=FULL)
        self.tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in state.items()}
        return {"step": step, "eval_loss": eval_loss}

    def put_back(self, model: nn.Module) -> bool:
        """Load the kept weights into ``model``; False when there are none to put back."""
        if not self.enabled or self.tensors is None:
            return False
        from segprop_ray.core.training import load_trainable  # training imports this module

        load_trainable(model, self.tensors)
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kept tensors (empty when none), for a checkpoint."""
        return dict(self.tensors or {})

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` gave."""
        self.tensors = dict(tensors) if tensors else None
