"""Exit criteria: when one iteration stops (per layer), and when the run stops adding depth (global).

Every decision is a record carrying the numbers that led to it, so a user can read why a layer
stopped at step 140 or why the run kept a 14-layer model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class StopDecision:
    """Why one iteration stopped."""

    reason: str
    """``max_steps``, ``epochs``, ``plateau`` or ``target_loss``."""
    step: int
    eval_loss: float | None
    best_eval_loss: float | None
    detail: str


class IterationExit:
    """Per-iteration criteria besides the step budget: plateau with patience, and a target loss."""

    def __init__(self, patience: int = 0, min_delta: float = 0.0, target_loss: float | None = None, by_epochs: bool = True):
        self.patience, self.min_delta, self.target_loss = patience, min_delta, target_loss
        self.by_epochs = by_epochs

    @classmethod
    def from_config(cls, layer_exit: Any, args: Any) -> "IterationExit":
        """From ``exit.layer`` and the training args (which say whether the budget is steps or epochs)."""
        return cls(layer_exit.patience, layer_exit.min_delta, layer_exit.target_loss, by_epochs=args.max_steps <= 0)

    def observe(self, memo: dict[str, Any], step: int, eval_loss: float) -> StopDecision | None:
        """Record an evaluation in ``memo`` (the loop's saved exit state); a decision if the segment should stop."""
        best = memo.get("best")
        memo["last"] = eval_loss
        if best is None or eval_loss < best - self.min_delta:
            memo["best"], memo["since_best"] = eval_loss, 0
        else:
            memo["since_best"] = memo.get("since_best", 0) + 1
        best = memo["best"]
        if self.target_loss is not None and eval_loss <= self.target_loss:
            detail = f"eval loss {eval_loss:.4f} <= target {self.target_loss:.4f} at step {step}"
            return StopDecision("target_loss", step, eval_loss, best, detail)
        if self.patience and memo["since_best"] >= self.patience:
            detail = (
                f"eval loss {eval_loss:.4f} did not improve on best {best:.4f} by {self.min_delta} "
                f"for {memo['since_best']} evaluations (patience {self.patience}) at step {step}"
            )
            return StopDecision("plateau", step, eval_loss, best, detail)
        return None

    def budget_spent(self, memo: dict[str, Any], step: int, total: int) -> StopDecision:
        """The decision when the step (or epoch) budget is used up."""
        reason = "epochs" if self.by_epochs else "max_steps"
        best = memo.get("best")
        detail = f"step budget reached: {step}/{total} steps ({reason})"
        return StopDecision(reason, step, memo.get("last"), best, detail)


@dataclass
class DepthDecision:
    """Whether the run trains a layer after ``depth``, and why."""

    depth: int
    continue_training: bool
    reason: str
    detail: str
    eval_loss: float | None
    best_depth: int | None
    best_eval_loss: float | None


class RunExit:
    """Global exit: stop adding depth at a target loss, on a plateau over layers, or at a depth budget."""

    def __init__(self, target_loss: float | None = None, patience_layers: int = 0, min_delta: float = 0.0, max_depth: int | None = None):
        self.target_loss, self.patience_layers = target_loss, patience_layers
        self.min_delta, self.max_depth = min_delta, max_depth

    @classmethod
    def from_config(cls, run_exit: Any) -> "RunExit":
        """From ``exit.run`` of the config."""
        return cls(run_exit.target_loss, run_exit.patience_layers, run_exit.min_delta, run_exit.max_depth)

    def decide(self, exit_losses: dict[int, float], depth: int, last_depth: int) -> DepthDecision:
        """Decide after ``depth`` was committed; ``exit_losses`` maps each committed exit depth to its eval loss."""
        loss = exit_losses.get(depth)
        best_depth, best = self._best(exit_losses)

        def decision(go_on: bool, reason: str, detail: str) -> DepthDecision:
            return DepthDecision(depth, go_on, reason, detail, loss, best_depth, best)

        if depth >= last_depth:
            return decision(False, "last_layer", f"layer {depth} is the last middle layer")
        if self.max_depth is not None and depth >= self.max_depth:
            return decision(False, "max_depth", f"depth budget reached: layer {depth} >= max_depth {self.max_depth}")
        if self.target_loss is not None and loss is not None and loss <= self.target_loss:
            return decision(False, "target_loss", f"exit {depth} eval loss {loss:.4f} <= target {self.target_loss:.4f}")
        stalled = self._layers_without_improvement(exit_losses, depth)
        if self.patience_layers and stalled >= self.patience_layers:
            detail = (
                f"exit eval loss has not improved on {best:.4f} (exit {best_depth}) by {self.min_delta} "
                f"for {stalled} layers (patience {self.patience_layers})"
            )
            return decision(False, "plateau", detail)
        return decision(True, "continue", f"exit {depth} eval loss {_fmt(loss)}; best {_fmt(best)} at exit {best_depth}")

    def _best(self, exit_losses: dict[int, float]) -> tuple[int | None, float | None]:
        if not exit_losses:
            return None, None
        depth = min(exit_losses, key=lambda d: (exit_losses[d], d))
        return depth, exit_losses[depth]

    def _layers_without_improvement(self, exit_losses: dict[int, float], depth: int) -> int:
        """Exits since the last one that improved on all earlier ones by ``min_delta``: layers, or segments when a
        Stage 2 iteration trains several layers (its exits are the segment boundaries)."""
        best, last_improved = None, None
        depths = sorted(k for k in exit_losses if k <= depth)
        for d in depths:
            if best is None or exit_losses[d] < best - self.min_delta:
                best, last_improved = exit_losses[d], d
        return 0 if last_improved is None else len([d for d in depths if d > last_improved])


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
