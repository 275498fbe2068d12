# ---------------------------------------------------------------------------------------------
# Copied unmodified (below this header) from /work/shared/reference/gpu_reference_loops.py on
# 2026-11-28. It is the CEO's anchor: the plain PyTorch + transformers loops whose H200 figures are
# in /work/shared/reference/anchors.md. It is not project code; do not edit it.
# benchmarks/segprop_bench.py imports it and calls its main() (adding only the extra shapes of its
# own CPU runs to SHAPES), so every project/reference ratio comes from one run on one device.
# ---------------------------------------------------------------------------------------------
"""Reference limits for SegProp-style training on one GPU (CEO anchor, not project code).

Plain PyTorch + transformers loops, no Ray, no I/O: what a segment step and an
E2E step cost on a given model shape. Prints one JSON line per variant.
Usage: python gpu_anchor.py --shape llama1b --seq 2048 --batch 4 --steps 8
"""
import argparse, json, time, gc
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    # Llama-3.2-1B shape
    "llama1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    # Mistral-7B shape, 12 of its 32 layers (per-layer figures are what matter)
    "mistral7b_12l": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=12,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
    # full Mistral-7B shape (32 layers): the true full-depth E2E anchor
    "mistral7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=32768),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
}

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()

def run_layers(model, layers, h, pos):
    pe = model.model.rotary_emb(h, position_ids=pos)
    for layer in layers:
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return h

def head_loss(model, h, labels):
    logits = model.lm_head(model.model.norm(h)).float()
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1))

def measure(name, step_fn, params, dev, steps, tokens):
    opt = torch.optim.AdamW(params, lr=1e-6, fused=dev.type == "cuda") if params else None
    def one():
        loss = step_fn()
        if opt is not None:
            loss.backward()
            opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    for _ in range(2):
        one()
    sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t = time.perf_counter(); one(); sync(dev); times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else None
    rec = dict(variant=name, median_step_s=round(med, 4), tokens_per_s=round(tokens / med),
               peak_gib=None if peak is None else round(peak, 2),
               trainable_params=sum(p.numel() for p in params) if params else 0)
    print(json.dumps(rec), flush=True)
    del opt; gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return rec

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--prefix", type=int, default=None, help="frozen prefix depth p (default n/2)")
    ap.add_argument("--r", type=int, default=2)
    ap.add_argument("--variants", default="e2e,e2e_ac,seg_snap,seg_recompute,lw_snap,snap_write")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = LlamaConfig(**SHAPES[a.shape], max_position_embeddings=max(4096, a.seq),
                      attn_implementation="sdpa", tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(dev)  # fp32 master weights, bf16 autocast (HF Trainer bf16=True)
    n = cfg.num_hidden_layers
    p = a.prefix if a.prefix is not None else min(n // 2, n - a.r - 2)
    layers = model.model.layers
    tokens = a.seq * a.batch
    ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq), device=dev)
    pos = torch.arange(a.seq, device=dev).unsqueeze(0)
    ac = torch.autocast(dev.type, dtype=torch.bfloat16)
    print(json.dumps(dict(device=torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
                          torch=torch.__version__, shape=a.shape, n_layers=n, prefix=p, r=a.r,
                          seq=a.seq, batch=a.batch, total_params=sum(x.numel() for x in model.parameters()),
                          snapshot_bytes_per_token_bf16=cfg.hidden_size * 2)), flush=True)
    want = a.variants.split(",")
    for prm in model.parameters():
        prm.requires_grad_(False)

    def trainable(mods):
        ps = [x for m in mods for x in m.parameters()]
        for x in ps:
            x.requires_grad_(True)
        return ps

    def freeze_all():
        for prm in model.parameters():
            prm.requires_grad_(False); prm.grad = None

    if "e2e" in want:
        ps = trainable([model]);
        def step():
            with ac:
                return model(input_ids=ids, labels=ids).loss
        measure("e2e", step, ps, dev, a.steps, tokens); freeze_all()
    if "e2e_ac" in want:
        model.gradient_checkpointing_enable(); model.train()
        ps = trainable([model])
        def step():
            with ac:
                return model(input_ids=ids, labels=ids).loss
        measure("e2e_ac", step, ps, dev, a.steps, tokens); freeze_all()
        model.gradient_checkpointing_disable()
    # frozen prefix output z = f^[0:p](x), cached once (SnapCheck in memory)
    with torch.no_grad(), ac:
        z = run_layers(model, layers[: p + 1], model.model.embed_tokens(ids), pos).to(torch.bfloat16)
    ll_layers = list(layers[n - a.r:]) if a.r else []
    cur = layers[p + 1]
    if "seg_snap" in want:
        ps = trainable([cur, *ll_layers, model.model.norm, model.lm_head])
        def step():
            with ac:
                h = run_layers(model, [cur, *ll_layers], z.detach(), pos)
                return head_loss(model, h, ids)
        measure("seg_snap", step, ps, dev, a.steps, tokens); freeze_all()
    if "seg_recompute" in want:
        ps = trainable([cur, *ll_layers, model.model.norm, model.lm_head])
        def step():
            with ac:
                with torch.no_grad():
                    zz = run_layers(model, layers[: p + 1], model.model.embed_tokens(ids), pos)
                h = run_layers(model, [cur, *ll_layers], zz.detach(), pos)
                return head_loss(model, h, ids)
        measure("seg_recompute", step, ps, dev, a.steps, tokens); freeze_all()
    if "lw_snap" in want:
        ps = trainable([cur, model.model.norm, model.lm_head])
        def step():
            with ac:
                h = run_layers(model, [cur], z.detach(), pos)
                return head_loss(model, h, ids)
        measure("lw_snap", step, ps, dev, a.steps, tokens); freeze_all()
    if "snap_write" in want:
        # incremental snapshot: S[p+1] = f_{p+1}(S[p]), one layer forward, no grad, to host memory
        host = torch.empty_like(z, device="cpu", pin_memory=dev.type == "cuda")
        def step():
            with torch.no_grad(), ac:
                zz = run_layers(model, [cur], z, pos).to(torch.bfloat16)
            host.copy_(zz, non_blocking=True)
            return zz
        measure("snap_write_1layer_d2h", step, [], dev, a.steps, tokens)

if __name__ == "__main__":
    main()
