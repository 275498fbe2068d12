"""Set-up of the training-step benchmark: shapes, a model directory and a real run directory.

Everything goes through the project's own code, as a pipeline run would leave it for a worker:
token shards written with ``write_token_shards`` and committed with ``commit_depth``; snapshot depths
S[d] produced by ``transform_file`` with a producer built by ``ModelParts`` from the model directory;
exit files (LL + head, what iteration q-1 leaves for iteration q) put with ``WeightStore``. The model is
built from a ``LlamaConfig`` (no download) with the reference script's shapes and saved as safetensors
(bf16 on disk, as hub checkpoints are), so workers read only the tensors of their own pieces.

Imported by ``segprop_bench.py`` (the command) and ``bench_variants.py`` (the timed worker process).
Never imports Ray.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
REFERENCE_ENV = "SEGPROP_REFERENCE_DIR"
"""Directory holding the reference loops (``gpu_reference_loops.py``); see :func:`reference_dir`."""
REFERENCE_DIRS = (ROOT.parent / "shared" / "reference", ROOT / ".reference")
"""Where the reference loops are looked for when ``SEGPROP_REFERENCE_DIR`` is not set: the shared reference
beside the repository, then the git-ignored ``.reference/`` a device call carries (see gpu_check.sh)."""

# Shapes the reference script does not have (its SHAPES gets them added at run time, see reference_shapes()).
EXTRA_SHAPES: dict[str, dict[str, int]] = {
    # small enough for a few minutes on 2 CPU cores, deep enough (12 layers) for the depth-scaling rows
    "cpu_small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=12,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=8192),
}
# seq, batch and steps per shape when not given (GPU shapes: the anchor's 4 x 2048, full 7B at batch 1)
SHAPE_DEFAULTS: dict[str, dict[str, int]] = {
    "tiny": dict(seq=128, batch=2, steps=4),
    "cpu_small": dict(seq=256, batch=4, steps=5),
    "llama1b": dict(seq=2048, batch=4, steps=8),
    "mistral7b_12l": dict(seq=2048, batch=4, steps=8),
    "mistral7b": dict(seq=2048, batch=1, steps=8),
}
TOKENS_HASH = "bench-tokens"
ENV_CACHE = "SEGPROP_CACHE"


def reference_dir() -> Path:
    """The directory of the reference loops: ``SEGPROP_REFERENCE_DIR`` (``--reference-dir``), else the first of
    :data:`REFERENCE_DIRS` that has them; a one-line error naming where it looked otherwise."""
    chosen = os.environ.get(REFERENCE_ENV)
    candidates = [Path(chosen)] if chosen else list(REFERENCE_DIRS)
    for directory in candidates:
        if (directory / "gpu_reference_loops.py").is_file():
            return directory.resolve()
    raise SystemExit(f"gpu_reference_loops.py not found in {', '.join(map(str, candidates))}: pass --reference-dir "
                     f"or set {REFERENCE_ENV} to the directory of the shared reference loops")


def reference_module():
    """The reference script (``gpu_reference_loops.py`` of :func:`reference_dir`, loaded as it is) with the extra
    shapes added."""
    if "gpu_reference_loops" not in sys.modules:
        path = reference_dir() / "gpu_reference_loops.py"
        spec = importlib.util.spec_from_file_location("gpu_reference_loops", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["gpu_reference_loops"] = module
        spec.loader.exec_module(module)
    ref = sys.modules["gpu_reference_loops"]
    for name, shape in EXTRA_SHAPES.items():
        ref.SHAPES.setdefault(name, shape)
    return ref


def micro_batches(warmup: int, steps: int, device: str) -> int:
    """Steps a variant trains: the warm-up, the timed ones and, on CPU, the profiled one after them."""
    return warmup + steps + (1 if device == "cpu" else 0)


def shape_dict(name: str) -> dict[str, int]:
    """The config fields of shape ``name`` (the reference's own table first)."""
    shapes = {**EXTRA_SHAPES, **reference_module().SHAPES}
    if name not in shapes:
        raise SystemExit(f"unknown shape {name!r}; known: {', '.join(sorted(shapes))}")
    return dict(shapes[name])


def llama_config(shape: str, seq: int):
    """The same ``LlamaConfig`` the reference builds (untied head, SDPA attention)."""
    from transformers import LlamaConfig

    return LlamaConfig(**shape_dict(shape), max_position_embeddings=max(4096, seq),
                       attn_implementation="sdpa", tie_word_embeddings=False)


def snapshot_hash(depth: int) -> str:
    """The weights hash the bench's S[depth] markers carry (what a stage-2 job expects to read)."""
    return f"bench-depth-{depth}"


@dataclass
class BenchPlan:
    """Everything a variant process needs (written as plan.json in the work directory)."""

    device: str
    shape: str
    seq: int
    batch: int
    steps: int
    warmup: int
    prefix: int
    r: int
    num_layers: int
    hidden_size: int
    group_size: int
    groups_per_file: int
    train_blocks: int
    eval_blocks: int
    work_dir: str
    lr: float = 1e-6
    max_grad_norm: float = 1.0
    loss_chunk_tokens: int = 0
    head_loss: str = "auto"
    """``training.head_loss`` of the jobs: ``auto``, ``chunked`` or ``fused`` (Liger Kernel, CUDA)."""
    threads: int = 0
    snap_files: int = 1
    """Files the snap_write variant writes at once (as ``resources.snapshot.files_per_actor``)."""
    snap_tokens: int = 0
    """Tokens snap_write transforms at least (passes over the train split; 0: one pass)."""
    files: dict[str, str] = field(default_factory=dict)
    """Exit files put in the run directory: run-relative path -> sha256."""
    snapshot_depths: list[int] = field(default_factory=list)
    setup_s: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> str:
        return str(Path(self.work_dir) / "run")

    @property
    def model_dir(self) -> str:
        return str(Path(self.work_dir) / "model")

    @property
    def cache_dir(self) -> str:
        return str(Path(self.work_dir) / "cache")

    @property
    def deep(self) -> int:
        """Deepest prefix a stage-2 iteration reads: p = n - r - 2 (trains the last middle layer)."""
        return self.num_layers - self.r - 2

    def depth_points(self) -> list[int]:
        """Prefix depths p of the stage-2 rows: the default one and the depth-scaling ends (1, n-r-2)."""
        return sorted({self.prefix, 1, self.deep})

    def save(self) -> Path:
        path = Path(self.work_dir) / "plan.json"
        path.write_text(json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BenchPlan":
        return cls(**json.loads(Path(path).read_text()))

    @property
    def profiled_step(self) -> int | None:
        """On CPU, one untimed step after the timed ones, run under the tensor-memory probe."""
        return micro_batches(self.warmup, self.steps, self.device) if self.device == "cpu" else None

    def job_config(self, mode: str, prefix: int) -> dict[str, Any]:
        """The run config a pipeline job of this shape would get (``JobContext.config``); p and r only where ``mode``
        uses them (the config refuses a setting its mode does nothing with)."""
        from segprop_ray.config.segprop import unused_settings

        segprop = {"mode": mode, "base_depth": prefix, "last_layers": self.r}
        return {
            "run_dir": self.run_dir,
            "model": self.model_dir,
            "data": {"train": str(Path(self.work_dir) / "unused-train.jsonl"), "seq_len": self.seq, "shuffle": True},
            "segprop": {key: value for key, value in segprop.items() if key not in unused_settings(mode)},
            "training": {"learning_rate": self.lr, "max_steps": self.profiled_step or self.warmup + self.steps, "bf16": True,
                         "per_device_train_batch_size": self.batch, "per_device_eval_batch_size": self.batch,
                         "max_grad_norm": self.max_grad_norm, "loss_chunk_tokens": self.loss_chunk_tokens,
                         "head_loss": self.head_loss,
                         "logging_steps": 1, "save_steps": 1_000_000, "max_eval_blocks": self.batch, "seed": 0},
            "snapcheck": {"dtype": "bf16", "rows_per_group": self.group_size,
                          "groups_per_file": self.groups_per_file},
        }

    def spec(self):
        from segprop_ray.storage.shard_format import ShardSpec

        return ShardSpec(self.seq, self.group_size, self.groups_per_file, self.hidden_size, "bfloat16", "none")


def make_plan(args: Any, work_dir: Path) -> BenchPlan:
    """The plan of one benchmark run from the command's arguments."""
    from segprop_ray.core.data_order import default_group_size

    shape = shape_dict(args.shape)
    n, hidden = shape["num_hidden_layers"], shape["hidden_size"]
    prefix = args.prefix if args.prefix is not None else min(n // 2, n - args.r - 2)  # the reference's default
    if not 1 <= prefix <= n - args.r - 2:
        raise SystemExit(f"--prefix {prefix} outside 1..{n - args.r - 2} for {n} layers and r={args.r}")
    # the project's default row group (~64 MiB of activations), but at most two micro-batches, so that
    # even small shapes read several row groups and the reader's wait shows in the timed steps
    group = min(default_group_size(args.seq, hidden, 2), 2 * args.batch)
    micro = micro_batches(args.warmup, args.steps, args.device)
    train_blocks = -(-args.batch * micro // group) * group
    return BenchPlan(device=args.device, shape=args.shape, seq=args.seq, batch=args.batch, steps=args.steps,
                     warmup=args.warmup, prefix=prefix, r=args.r, num_layers=n, hidden_size=hidden,
                     group_size=group, groups_per_file=args.groups_per_file, train_blocks=train_blocks,
                     eval_blocks=args.batch, work_dir=str(work_dir), lr=args.lr, max_grad_norm=args.max_grad_norm,
                     loss_chunk_tokens=args.loss_chunk_tokens, head_loss=getattr(args, "head_loss", "auto"),
                     threads=args.threads,
                     snap_files=getattr(args, "snap_files", 1), snap_tokens=getattr(args, "snap_tokens", 0))


def prepare(plan: BenchPlan) -> BenchPlan:
    """Model directory, token shards, snapshot depths and exit files of ``plan`` (timings in ``setup_s``)."""
    import torch

    os.environ.setdefault(ENV_CACHE, plan.cache_dir)
    device = torch.device(plan.device)
    timings = {}
    start = time.perf_counter()
    write_model_dir(plan, device)
    timings["model_dir_s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_tokens(plan)
    timings["tokens_s"] = time.perf_counter() - start
    start = time.perf_counter()
    write_snapshots(plan, device)
    timings["snapshots_s"] = time.perf_counter() - start
    start = time.perf_counter()
    plan.files = write_exit_files(plan)
    timings["exit_files_s"] = time.perf_counter() - start
    plan.setup_s = {k: round(v, 2) for k, v in timings.items()}
    plan.save()
    return plan


def write_model_dir(plan: BenchPlan, device) -> None:
    """A randomly initialised model of the shape, saved as bf16 safetensors (initialised on ``device``: fast)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(plan.shape, plan.seq))
    model.to(torch.bfloat16).save_pretrained(plan.model_dir)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()


def write_tokens(plan: BenchPlan) -> None:
    """Random token blocks of both splits, written and committed as the tokenize job does."""
    import torch

    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.shards import write_token_shards
    from segprop_ray.storage.snapcheck import commit_depth

    layout, spec = RunLayout.open(plan.run_dir), plan.spec()
    vocab = shape_dict(plan.shape)["vocab_size"]
    gen = torch.Generator().manual_seed(1)
    for split, count in (("train", plan.train_blocks), ("eval", plan.eval_blocks)):
        ids = torch.randint(0, vocab, (count, plan.seq), generator=gen)  # (N, T) int64
        commit_depth(layout, split, None, write_token_shards(layout, split, ids, spec), TOKENS_HASH, spec)


def write_snapshots(plan: BenchPlan, device) -> None:
    """S[d] for every depth the stage-2 rows read, chained one stretch of layers at a time with ``transform_file``.

    Set-up only: the producers run in bf16 (the values do not matter to the timings); the timed
    snapshot job (``snap_write``) runs the project's own fp32 producer.
    """
    import torch

    from segprop_ray.core.iteration import build_segment
    from segprop_ray.core.parts import ModelParts
    from segprop_ray.core.plan import snapshot_spec
    from segprop_ray.core.weights import SafetensorsSource
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.snapcheck import commit_depth, transform_file
    from transformers import AutoConfig

    layout, spec = RunLayout.open(plan.run_dir), plan.spec()
    parts = ModelParts(AutoConfig.from_pretrained(plan.model_dir), device, dtype=torch.bfloat16)
    base = SafetensorsSource.from_model_dir(plan.model_dir)
    previous = None
    for depth in plan.depth_points():
        first = 0 if previous is None else previous + 1
        producer = build_segment(parts, snapshot_spec(list(range(first, depth + 1)), base, embed=previous is None),
                                 trainable=False)

        @torch.no_grad()
        def apply(rows, producer=producer):
            hidden = rows["hidden"].to(device) if "hidden" in rows else None
            return producer(rows["input_ids"].to(device), hidden).to(torch.bfloat16).cpu()  # (n, T, H)

        for split, count in (("train", plan.train_blocks), ("eval", plan.eval_blocks)):
            infos = [transform_file(layout, split, i, source_depth=previous, depth=depth, fn=apply, spec=spec)
                     for i in range(spec.num_files(count))]
            commit_depth(layout, split, depth, infos, snapshot_hash(depth), spec)
        previous = depth
        del producer, apply
    plan.snapshot_depths = plan.depth_points()


def write_exit_files(plan: BenchPlan) -> dict[str, str]:
    """``exits/exit-<p>/ll.safetensors`` (LL layers + norm + head) for every p a stage-2 row trains after."""
    from segprop_ray.core.weights import SafetensorsSource
    from segprop_ray.storage.layout import RunLayout
    from segprop_ray.storage.weights_store import WeightStore, exit_file

    layout = RunLayout.open(plan.run_dir)
    base = SafetensorsSource.from_model_dir(plan.model_dir)
    ll = tuple(f"model.layers.{i}." for i in range(plan.num_layers - plan.r, plan.num_layers))
    names = [k for k in base.keys() if k.startswith(ll + ("model.norm.", "lm_head."))]
    depths = plan.depth_points()
    store = WeightStore(layout, plan.cache_dir)
    sha = store.put(exit_file(depths[0]), {name: base.get(name) for name in names})
    source = layout.join(*exit_file(depths[0]).split("/"))
    for depth in depths[1:]:  # same bytes: copy the file rather than serialise it again
        target = layout.join(*exit_file(depth).split("/"))
        layout.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        layout.fs.copy(source, target)
    return {exit_file(depth): sha for depth in depths}


if __name__ == "__main__":  # python benchmarks/bench_setup.py PLAN.json: prepare the plan's directories
    prepare(BenchPlan.load(sys.argv[1]))
