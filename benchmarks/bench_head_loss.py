"""LM-head loss: the plain cross-entropy against the project's chunked one (and, with ``--fused``, the fused
kernel of ``training.head_loss: fused``), one forward + backward each.

For each chunk size: median time of a forward + backward, the peak memory above what was allocated
before it (CUDA ``max_memory_allocated``; on CPU the profiler's highest net allocation), and how far
the loss and the gradients are from the plain loss's. It answers what ``training.loss_chunk_tokens``
costs and saves on a card, without a whole training step around it. Never imports Ray.

    python benchmarks/bench_head_loss.py                                  # CPU, a small head
    python benchmarks/bench_head_loss.py --device cuda --shape llama1b    # 8,192 tokens x 2,048 x 128,256
    python benchmarks/bench_head_loss.py --device cuda --shape llama1b --fused   # + Liger's fused kernel
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_probes import max_net_allocated, peak_since_reset, reset_peak, sync  # noqa: E402
from bench_setup import SHAPE_DEFAULTS, shape_dict  # noqa: E402
from segprop_ray.core.fused_head_loss import fused_linear_cross_entropy, fused_unavailable  # noqa: E402
from segprop_ray.core.head_loss import LogitMath, chunk_tokens_for, linear_cross_entropy  # noqa: E402
from segprop_ray.core.optim import autocast_context  # noqa: E402


def head_shape(name: str) -> tuple[int, int, int]:
    """Tokens of one micro-batch (batch x seq of the training-step benchmark), hidden size and vocabulary."""
    step, model = SHAPE_DEFAULTS[name], shape_dict(name)
    return step["batch"] * step["seq"], model["hidden_size"], model["vocab_size"]


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def chunked(chunk: int) -> Callable:
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, None, targets, chunk)


def fused(hidden, weight, targets):
    """The fused kernel as ``training.head_loss: fused`` runs it: the sum over tokens over their count (the mean)."""
    return fused_linear_cross_entropy(hidden, weight, None, targets, targets.numel(), LogitMath())


def one_pass(fn: Callable, hidden, weight, targets, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with autocast_context(device, True):
        loss = fn(hidden, weight, targets)
    loss.backward()
    grads = [hidden.grad, weight.grad]
    hidden.grad = weight.grad = None
    return loss.detach(), grads


def peak_above_start(fn: Callable, device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated when it started."""
    if device.type == "cuda":
        sync(device)
        start = torch.cuda.memory_allocated(device)
        reset_peak(device)
        fn()
        sync(device)
        return peak_since_reset(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max_net_allocated(prof)


def measure(name: str, fn: Callable, tensors, device, reference, repeats: int) -> tuple[dict[str, Any], tuple]:
    """One variant's record (median time, peak, differences from ``reference``) and its (loss, grads)."""
    hidden, weight, targets = tensors
    one_pass(fn, hidden, weight, targets, device)  # warm-up
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        loss, grads = one_pass(fn, hidden, weight, targets, device)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = peak_above_start(lambda: one_pass(fn, hidden, weight, targets, device), device)
    record = {"variant": name, "median_s": round(statistics.median(times), 5), "peak_bytes": peak}
    if reference is not None:
        ref_loss, ref_grads = reference
        record["loss_abs_diff"] = float((loss - ref_loss).abs())
        record["grad_rel_diff"] = [float((g - r).float().norm() / r.float().norm()) for g, r in zip(grads, ref_grads)]
    return record, (loss, grads)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default=None, help=f"one of {sorted(SHAPE_DEFAULTS)} (default: cpu_small / llama1b)")
    parser.add_argument("--chunks", default="256,1024,0,4096", help="chunk sizes in tokens (0: the default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--fused", action="store_true", help="add a row for the fused kernel (CUDA, liger-kernel)")
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    why_not = fused_unavailable(device) if args.fused else None
    if why_not:
        raise SystemExit(f"bench_head_loss.py: --fused: the fused kernel cannot run here: {why_not}")
    shape = args.shape or ("llama1b" if device.type == "cuda" else "cpu_small")
    tokens, hidden_size, vocab = head_shape(shape)
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).requires_grad_()  # (N, H) fp32
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) * hidden_size ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    tensors = (hidden, weight, targets)

    record, reference = measure("plain", plain, tensors, device, None, args.repeats)
    records = [record]
    for chunk in (int(c) for c in args.chunks.split(",")):
        size = chunk or chunk_tokens_for(vocab)
        label = f"chunked {size}" + (" (default)" if not chunk else "")
        records.append(measure(label, chunked(size), tensors, device, reference, args.repeats)[0])
    if args.fused:
        records.append(measure("fused (liger-kernel)", fused, tensors, device, reference, args.repeats)[0])
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", "shape": shape,
              "tokens": tokens, "hidden": hidden_size, "vocab": vocab, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d")}
    print(f"LM-head loss, {shape}: {tokens} tokens x hidden {hidden_size} x vocab {vocab}, bf16 autocast, "
          f"fp32 weights, on {header['device']}")
    print(f"{'variant':24s} {'median s':>10s} {'peak MiB':>10s} {'loss diff':>10s}  grad rel diff (hidden, weight)")
    for r in records:
        diffs = " ".join(f"{d:.1e}" for d in r.get("grad_rel_diff", []))
        print(f"{r['variant']:24s} {r['median_s']:10.4f} {r['peak_bytes'] / 2**20:10.0f} "
              f"{r.get('loss_abs_diff', 0):10.1e}  {diffs}")
    if args.out:
        Path(args.out).write_text(json.dumps({"header": header, "records": records}, indent=1))


if __name__ == "__main__":
    main()
