"""Algorithm 1 as data: which layers each stage trains, commits and keeps, for each mode.

Notation of the paper: n decoder layers; base depth p; LL^(r) = the last r layers + final norm +
LM head. Stage 1 trains layers 0..p with LL. Stage 2 trains each middle layer q = p+1 .. n-r-1
alone with LL, fed by the frozen prefix's output. ``lw`` is the same with r = 0 (q up to n-1);
``e2e`` trains everything at once.
"""

from __future__ import annotations

from dataclasses import dataclass

from segprop_ray.core.layout import ArchLayout
from segprop_ray.core.parts import SegmentSpec
from segprop_ray.core.weights import TensorSource


@dataclass(frozen=True)
class SegPropPlan:
    """The layer bookkeeping of one run."""

    num_layers: int
    base_depth: int
    last_layers: int
    mode: str = "segprop"

    def __post_init__(self) -> None:
        if self.mode not in ("segprop", "lw", "e2e"):
            raise ValueError(f"unknown mode {self.mode!r}")
        if self.mode != "e2e" and self.base_depth + self.last_layers > self.num_layers - 2:
            raise ValueError(
                f"base_depth + last_layers = {self.base_depth} + {self.last_layers} leaves no middle layer "
                f"in a {self.num_layers}-layer model"
            )

    @classmethod
    def from_config(cls, segprop: object, num_layers: int) -> "SegPropPlan":
        """From the ``segprop`` config section: ``lw`` forces r = 0; ``e2e`` is Stage 1 over all layers."""
        mode = segprop.mode  # type: ignore[attr-defined]
        if mode == "e2e":
            return cls(num_layers, num_layers - 1, 0, mode)
        r = 0 if mode == "lw" else segprop.last_layers  # type: ignore[attr-defined]
        return cls(num_layers, segprop.base_depth, r, mode)  # type: ignore[attr-defined]

    @property
    def prefix_layers(self) -> list[int]:
        """Layers 0..p of the base prefix."""
        return list(range(self.base_depth + 1))

    @property
    def ll_layers(self) -> list[int]:
        """Decoder layers of LL: the last r."""
        return list(range(self.num_layers - self.last_layers, self.num_layers))

    @property
    def middle_layers(self) -> list[int]:
        """Stage 2 iterations: q = p+1 .. n-r-1."""
        return list(range(self.base_depth + 1, self.num_layers - self.last_layers))

    @property
    def last_depth(self) -> int:
        """Deepest exit: the last middle layer."""
        return self.num_layers - self.last_layers - 1

    def stage_of(self, depth: int) -> str:
        """``stage1``, ``stage2`` or ``e2e``: which kind of iteration commits ``depth``."""
        if self.mode == "e2e":
            return "e2e"
        return "stage1" if depth == self.base_depth else "stage2"

    def exit_layers(self, depth: int) -> list[int]:
        """Decoder layers (original indices) of the model that exits at ``depth``: 0..depth, then LL."""
        return list(range(depth + 1)) + self.ll_layers

    def exit_num_layers(self, depth: int) -> int:
        """``num_hidden_layers`` of the model exported at ``depth``."""
        return depth + 1 + self.last_layers


def stage1_spec(plan: SegPropPlan, base: TensorSource, tied: bool = False) -> SegmentSpec:
    """Stage 1: embeddings + layers 0..p + LL + head, middle layers skipped (E2E: every layer); a tied model's
    head and embedding stay one tensor."""
    layers = [(i, base) for i in plan.prefix_layers + plan.ll_layers]
    return SegmentSpec(layers=layers, embed_source=base, head_source=base, tie_head=tied)


def stage2_spec(plan: SegPropPlan, q: int, layer: TensorSource, ll: TensorSource, head: TensorSource) -> SegmentSpec:
    """Stage 2 iteration q: f_q (from ``layer``) + LL layers (reset from ``ll``) + head (from ``head``)."""
    layers = [(q, layer)] + [(i, ll) for i in plan.ll_layers]
    return SegmentSpec(layers=layers, head_source=head)


def exit_is_tied(plan: SegPropPlan, depth: int, tied_model: bool) -> bool:
    """Whether exit ``depth`` of a run keeps the model's tied embeddings: a Stage 1 or E2E exit trained head and
    embedding as one tensor; a Stage 2 exit trained its head while the embedding stayed frozen (untied)."""
    return tied_model and plan.stage_of(depth) != "stage2"


def snapshot_spec(layers: list[int], source: TensorSource, embed: bool) -> SegmentSpec:
    """A hidden-state producer: ``layers`` (after the embedder when ``embed``), no head."""
    return SegmentSpec(layers=[(i, source) for i in layers], embed_source=source if embed else None)


def split_exit_weights(tensors: dict, layout: ArchLayout, plan: SegPropPlan) -> tuple[dict, dict]:
    """Split a trained segment's weights into (committed: prefix/f_q + head, exit: LL layers + head)."""
    ll_prefixes = tuple(layout.layer_path(i) + "." for i in plan.ll_layers)
    head_prefixes = tuple(p + "." for p in layout.head_paths())
    committed = {k: v for k, v in tensors.items() if not k.startswith(ll_prefixes)}
    exit_weights = {k: v for k, v in tensors.items() if k.startswith(ll_prefixes + head_prefixes)}
    return committed, exit_weights


def segment_seed(seed: int, depth: int) -> int:
    """The torch seed set before training the segment that commits ``depth`` (dropout, etc.)."""
    return seed * 1009 + depth
