"""LM-head loss: the plain cross-entropy against the project's chunked one, one forward + backward each.

For each chunk size: median time of a forward + backward, the peak memory above what was allocated
before it (CUDA ``max_memory_allocated``; on CPU the profiler's highest net allocation), and how far
the loss and the gradients are from the plain loss's. It answers what ``training.loss_chunk_tokens``
costs and saves on a card, without a whole training step around it. Never imports Ray.

    python benchmarks/bench_head_loss.py                                  # CPU, a small head
    python benchmarks/bench_head_loss.py --device cuda --shape llama1b    # 8,192 tokens x 2,048 x 128,256
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

from bench_probes import max_net_allocated  # noqa: E402
from segprop_ray.core.head_loss import chunk_tokens_for, linear_cross_entropy  # noqa: E402

SHAPES = {  # tokens per micro-batch (B x (T-1) rounded), hidden, vocabulary
    "cpu_small": (1024, 256, 8192),
    "llama1b": (8192, 2048, 128256),
    "mistral7b": (8192, 4096, 32000),
}


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets)


def chunked(chunk: int) -> Callable:
    return lambda hidden, weight, targets: linear_cross_entropy(hidden, weight, None, targets, chunk)


def one_pass(fn: Callable, hidden, weight, targets, device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.autocast(device.type, dtype=torch.bfloat16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    grads = [hidden.grad, weight.grad]
    hidden.grad = weight.grad = None
    return loss.detach(), grads


def peak_above_start(fn: Callable, device: torch.device) -> int:
    """Bytes allocated at the peak of ``fn()`` beyond what was allocated when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max_net_allocated(prof)


def measure(name: str, fn: Callable, tensors, device, reference, repeats: int) -> dict[str, Any]:
    hidden, weight, targets = tensors
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    one_pass(fn, hidden, weight, targets, device)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        loss, grads = one_pass(fn, hidden, weight, targets, device)
        sync()
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
    parser.add_argument("--shape", default=None, help=f"one of {sorted(SHAPES)} (default: cpu_small / llama1b)")
    parser.add_argument("--chunks", default="256,1024,0,4096", help="chunk sizes in tokens (0: the default)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    shape = args.shape or ("llama1b" if device.type == "cuda" else "cpu_small")
    tokens, hidden_size, vocab = SHAPES[shape]
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device=device, generator=gen).requires_grad_()  # (N, H) fp32
    weight = (torch.randn(vocab, hidden_size, device=device, generator=gen) * hidden_size ** -0.5).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), device=device, generator=gen)
    tensors = (hidden, weight, targets)

    records, reference = [], None
    record, reference = measure("plain", plain, tensors, device, None, args.repeats)
    records.append(record)
    for chunk in (int(c) for c in args.chunks.split(",")):
        size = chunk or chunk_tokens_for(vocab)
        label = f"chunked {size}" + (" (default)" if not chunk else "")
        records.append(measure(label, chunked(size), tensors, device, reference, args.repeats)[0])
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
