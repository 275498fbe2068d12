"""Algorithm 1 as data: which layers each stage trains, commits and keeps, for each mode.

Notation of the paper: n decoder layers; base depth p; LL^(r) = the last r layers + final norm +
LM head. Stage 1 trains layers 0..p with LL. Stage 2 trains the middle layers p+1 .. n-r-1 with LL,
one segment at a time, fed by the frozen prefix's output: a segment is ``segment_layers`` consecutive
layers (the last one may be shorter), or, with ``granularity: sublayer``, one half of a layer (its
attention half, then its MLP half). ``lw`` is the same with r = 0; ``e2e`` trains everything at once,
``lora`` is ``e2e`` with LoRA adapters. Every stage (in-process, the driver, the workers, the snapshot
job, the reports) reads the iterations from :meth:`SegPropPlan.iterations`.
"""

from __future__ import annotations

from dataclasses import dataclass

from segprop_ray.core.adapter_spec import LoraSpec
from segprop_ray.core.layout import ArchLayout
from segprop_ray.core.parts import SegmentSpec
from segprop_ray.core.weights import TensorSource


@dataclass(frozen=True)
class ModeSpec:
    """What a mode runs."""

    end_to_end: bool
    """One iteration trains every layer at once (no Stage 2, no snapshots)."""
    uses_last_layers: bool
    """LL has the configured r decoder layers (else r = 0: the LM head only)."""
    needs_adapter: bool
    """Trains LoRA adapters (a default LoRA when ``segprop.adapter`` is not set)."""
    name: str
    """What the mode is called in model cards."""


MODES: dict[str, ModeSpec] = {
    "segprop": ModeSpec(False, True, False, "Segmented Propagation (SegProp)"),
    "lw": ModeSpec(False, False, False, "layer-wise training"),
    "e2e": ModeSpec(True, False, False, "end-to-end fine-tuning"),
    "lora": ModeSpec(True, False, True, "end-to-end LoRA fine-tuning"),
}
"""The modes of a run: ``segprop`` (the paper), its baselines ``lw`` and ``e2e``, and the LoRA baseline."""

PARTS = ("layer", "attn", "mlp")
"""What a Stage 2 iteration trains of its layers: all of them, or one half of one layer."""


@dataclass(frozen=True)
class Iteration:
    """One training run of the algorithm (one Ray Train job): Stage 1, E2E, or a Stage 2 segment."""

    stage: str
    """``stage1``, ``stage2`` or ``e2e``."""
    first: int
    """First decoder layer it trains (0 for Stage 1 and E2E)."""
    last: int
    """Deepest layer it commits: the exit depth of the model it leaves."""
    part: str = "layer"
    """``layer`` (whole layers), ``attn`` or ``mlp`` (that half of layer ``first`` = ``last``)."""

    @property
    def key(self) -> str:
        """Its name in the manifest: the exit depth, ``<depth>-attn`` for an attention half (which is no exit)."""
        return f"{self.last}-attn" if self.part == "attn" else str(self.last)

    @property
    def layers(self) -> list[int]:
        """The middle layers of a Stage 2 segment (Stage 1 and E2E: the layers up to ``last``)."""
        return list(range(self.first, self.last + 1))

    @property
    def commits_depth(self) -> bool:
        """Whether it completes depth ``last``: an exit, a snapshot and a global exit decision follow."""
        return self.part != "attn"

    @property
    def half(self) -> str | None:
        """``attn`` or ``mlp`` for a half-layer iteration, else None."""
        return None if self.part == "layer" else self.part

    @property
    def label(self) -> str:
        """How people see it: ``Stage 1 (layers 0..2 + LL)``, ``layers 3-4``, ``layer 5 attn``."""
        if self.stage == "stage1":
            return f"Stage 1 (layers 0..{self.last} + LL)"
        if self.stage == "e2e":
            return "E2E (all layers)"
        span = f"layer {self.first}" if self.first == self.last else f"layers {self.first}-{self.last}"
        return span if self.part == "layer" else f"{span} {self.part}"


def iteration_order(key: str) -> tuple[int, int]:
    """Sort key of a manifest iteration key: by depth, an attention half before its layer's MLP half."""
    depth, _, part = key.partition("-")
    return int(depth), 0 if part == "attn" else 1


@dataclass(frozen=True)
class SegPropPlan:
    """The layer bookkeeping of one run."""

    num_layers: int
    base_depth: int
    last_layers: int
    mode: str = "segprop"
    segment_layers: int = 1
    """k: middle layers per Stage 2 iteration (the last segment may be shorter)."""
    granularity: str = "layer"
    """``layer``, or ``sublayer``: every middle layer is two iterations, its attention half then its MLP half."""
    adapter: LoraSpec | None = None
    """LoRA adapters trained instead of full weights (None: full weights)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}")
        if not self.spec.end_to_end and self.base_depth + self.last_layers > self.num_layers - 2:
            raise ValueError(
                f"base_depth + last_layers = {self.base_depth} + {self.last_layers} leaves no middle layer "
                f"in a {self.num_layers}-layer model"
            )
        if self.segment_layers < 1 or self.granularity not in ("layer", "sublayer"):
            raise ValueError(f"segment_layers {self.segment_layers} / granularity {self.granularity!r} is not valid")
        if self.granularity == "sublayer" and (self.segment_layers != 1 or self.spec.end_to_end):
            raise ValueError("granularity sublayer trains one layer's halves: it needs segment_layers 1 and a Stage 2")
        if self.spec.needs_adapter and self.adapter is None:
            raise ValueError(f"mode {self.mode} needs an adapter")

    @classmethod
    def from_config(cls, segprop: object, num_layers: int) -> "SegPropPlan":
        """From the ``segprop`` config section: ``lw`` forces r = 0; ``e2e``/``lora`` are one iteration over all
        layers; ``lora`` without ``segprop.adapter`` uses PEFT's default LoRA."""
        mode = segprop.mode  # type: ignore[attr-defined]
        adapter = segprop.adapter_spec()  # type: ignore[attr-defined]
        if MODES[mode].end_to_end:
            return cls(num_layers, num_layers - 1, 0, mode, adapter=adapter)
        r = segprop.last_layers if MODES[mode].uses_last_layers else 0  # type: ignore[attr-defined]
        return cls(num_layers, segprop.base_depth, r, mode, segprop.segment_layers,  # type: ignore[attr-defined]
                   segprop.granularity, adapter)  # type: ignore[attr-defined]

    @property
    def spec(self) -> ModeSpec:
        """What the mode runs."""
        return MODES[self.mode]

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
        """The layers Stage 2 trains: p+1 .. n-r-1."""
        return list(range(self.base_depth + 1, self.num_layers - self.last_layers))

    @property
    def segments(self) -> list[tuple[int, int]]:
        """Stage 2's segments as (first, last) layers: ``segment_layers`` consecutive middle layers each."""
        middle, k = self.middle_layers, self.segment_layers
        if self.spec.end_to_end:
            return []
        return [(middle[i], middle[min(i + k, len(middle)) - 1]) for i in range(0, len(middle), k)]

    @property
    def iterations(self) -> list[Iteration]:
        """Every iteration in order: Stage 1 (or E2E), then Stage 2's segments (two per layer with sublayers)."""
        if self.spec.end_to_end:
            return [Iteration("e2e", 0, self.num_layers - 1)]
        parts = ("attn", "mlp") if self.granularity == "sublayer" else ("layer",)
        stage2 = [Iteration("stage2", first, last, part) for first, last in self.segments for part in parts]
        return [Iteration("stage1", 0, self.base_depth)] + stage2

    @property
    def exit_depths(self) -> list[int]:
        """Depths with an exit: the base depth and the last layer of every segment."""
        return [it.last for it in self.iterations if it.commits_depth]

    def iteration(self, key: str | int) -> Iteration:
        """The iteration named ``key`` (a depth, or ``<depth>-attn``)."""
        for it in self.iterations:
            if it.key == str(key):
                return it
        raise KeyError(f"no iteration {key} in this plan (exit depths {self.exit_depths})")

    def source_depth(self, it: Iteration) -> int | None:
        """The snapshot depth a Stage 2 iteration reads: the exit before its first layer (None: tokens)."""
        return None if it.stage != "stage2" else it.first - 1

    @property
    def last_depth(self) -> int:
        """Deepest exit: the last middle layer."""
        return self.num_layers - self.last_layers - 1

    def stage_of(self, depth: int) -> str:
        """``stage1``, ``stage2`` or ``e2e``: which kind of iteration commits ``depth``."""
        if self.spec.end_to_end:
            return "e2e"
        return "stage1" if depth == self.base_depth else "stage2"

    @property
    def trains_head(self) -> bool:
        """Whether iterations train the LM head (not with LoRA adapters: PEFT leaves it frozen)."""
        return self.adapter is None

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


def stage2_spec(plan: SegPropPlan, layers: int | list[int], layer: TensorSource, ll: TensorSource,
                head: TensorSource) -> SegmentSpec:
    """A Stage 2 iteration: its segment's layers (from ``layer``) + LL layers (reset from ``ll``) + head (from
    ``head``)."""
    segment = [layers] if isinstance(layers, int) else list(layers)
    return SegmentSpec(layers=[(q, layer) for q in segment] + [(i, ll) for i in plan.ll_layers], head_source=head)


def exit_is_tied(plan: SegPropPlan, depth: int, tied_model: bool) -> bool:
    """Whether exit ``depth`` of a run keeps the model's tied embeddings: a Stage 1 or E2E exit trained head and
    embedding as one tensor; a Stage 2 exit trained its head while the embedding stayed frozen (untied), unless
    adapters left the head untouched."""
    return tied_model and (plan.stage_of(depth) != "stage2" or not plan.trains_head)


def snapshot_spec(layers: list[int], source: TensorSource, embed: bool) -> SegmentSpec:
    """A hidden-state producer: ``layers`` (after the embedder when ``embed``), no head."""
    return SegmentSpec(layers=[(i, source) for i in layers], embed_source=source if embed else None)


def split_exit_weights(tensors: dict, layout: ArchLayout, plan: SegPropPlan) -> tuple[dict, dict]:
    """Split a trained segment's weights into (committed: prefix/segment + head, exit: LL layers + head)."""
    ll_prefixes = tuple(layout.layer_path(i) + "." for i in plan.ll_layers)
    head_prefixes = tuple(p + "." for p in layout.head_paths())
    committed = {k: v for k, v in tensors.items() if not k.startswith(ll_prefixes)}
    exit_weights = {k: v for k, v in tensors.items() if k.startswith(ll_prefixes + head_prefixes)}
    return committed, exit_weights


def segment_seed(seed: int, depth: int) -> int:
    """The torch seed set before training the segment that commits ``depth`` (dropout, etc.)."""
    return seed * 1009 + depth
