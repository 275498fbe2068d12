"""The fused linear + cross-entropy head (Liger Kernel, CUDA) equals the chunked loss within bf16 rounding, with the
same selected positions, normaliser and family logit math; ``training.head_loss`` and ``training.optim`` choose and
refuse in one line. The kernel tests need CUDA and liger-kernel and are skipped elsewhere."""

import importlib.util

import pytest
import torch

from helpers import make_config, tiny_model_dir
from segprop_ray.core.fused_head_loss import logit_scale, resolve_head_loss
from segprop_ray.core.head_loss import NO_MATH, LogitMath, linear_cross_entropy
from segprop_ray.core.optim import build_optimizer

HAS_CUDA = torch.cuda.is_available()
HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
needs_kernel = pytest.mark.skipif(not (HAS_CUDA and HAS_LIGER),
                                  reason="the fused kernel runs on CUDA with liger-kernel (segprop_ray[cuda]); "
                                         f"here: CUDA {HAS_CUDA}, liger-kernel {HAS_LIGER}")
MATHS = {"plain": NO_MATH, "granite": LogitMath(divisor=8.0), "cohere": LogitMath(multiplier=0.0625),
         "gemma2": LogitMath(softcap=30.0)}


def test_auto_is_chunked_on_cpu_and_fused_is_refused_there_in_one_line():
    cpu = torch.device("cpu")
    assert resolve_head_loss("auto", cpu, NO_MATH) == resolve_head_loss("chunked", cpu, NO_MATH) == "chunked"
    with pytest.raises(ValueError, match=r"^training.head_loss: fused cannot be used: it runs on CUDA only \(device cpu\)$"):
        resolve_head_loss("fused", cpu, NO_MATH)
    assert logit_scale(LogitMath(multiplier=2.0, divisor=8.0)) == 0.25 and logit_scale(LogitMath(softcap=3.0)) is None


def test_adamw_8bit_is_refused_on_cpu_in_one_line(tmp_path):
    cfg = make_config(tiny_model_dir(tmp_path, "llama", 4), training={"optim": "adamw_8bit"})
    module = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"^training.optim adamw_8bit runs on CUDA only \(its bitsandbytes kernels\): "
                                         r"use adamw_torch on CPU$"):
        build_optimizer(module, cfg.training)
    from segprop_ray.pipeline.plan_checks import check_devices

    with pytest.raises(ValueError, match=r"adamw_8bit runs on CUDA only .* \(the training workers have no GPU"):
        check_devices(cfg)
    fused = make_config(tmp_path / "m", training={"head_loss": "fused"})
    with pytest.raises(ValueError, match=r"^training.head_loss: fused cannot be used: it runs on CUDA only"):
        check_devices(fused)


def leaves(n=300, h=64, v=1000, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 0.2).to(device).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = fn(hidden, weight, targets)
    loss.backward()
    grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    return loss.detach(), grads


@needs_kernel
@pytest.mark.parametrize("family", list(MATHS))
def test_fused_loss_equals_chunked_loss_within_bf16_rounding(family):
    from segprop_ray.core.fused_head_loss import fused_linear_cross_entropy

    math, tensors, normalizer = MATHS[family], leaves(), 417.0  # a step's label tokens, not this batch's
    chunked = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, None, t, 64, normalizer, math), *tensors)
    fused = loss_and_grads(lambda h, w, t: fused_linear_cross_entropy(h, w, None, t, normalizer, math), *tensors)
    assert resolve_head_loss("auto", torch.device("cuda"), math) == "fused"
    torch.testing.assert_close(fused[0], chunked[0], rtol=1e-2, atol=1e-2)
    for got, expected in zip(fused[1], chunked[1]):
        torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-4)


@needs_kernel
def test_a_fused_head_predicts_only_the_selected_positions(tmp_path):
    """Through :meth:`LMHead.next_token_loss`: the positions of ``predict_at`` and ``num_items`` as the chunked head."""
    from transformers import AutoConfig

    from segprop_ray.core.iteration import build_segment
    from segprop_ray.core.parts import ModelParts, SegmentSpec

    model_dir = tiny_model_dir(tmp_path, "llama", 2)
    parts = ModelParts(AutoConfig.from_pretrained(model_dir), "cuda")
    source = parts.base_source(model_dir)
    spec = SegmentSpec([(0, source), (1, source)], source, source)
    segments = {kind: build_segment(parts, spec, trainable=True, head_loss=kind) for kind in ("chunked", "fused")}
    assert segments["fused"].head.loss_kind == "fused" and segments["chunked"].head.loss_kind == "chunked"
    ids = torch.randint(3, 60, (2, 16), generator=torch.Generator().manual_seed(1)).cuda()
    predict_at = torch.tensor([0, 3, 4, 17, 20, 29], device="cuda")
    losses = {}
    for kind, segment in segments.items():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            losses[kind] = segment(ids, predict_at=predict_at, num_items=11)
        losses[kind].backward()
    torch.testing.assert_close(losses["fused"], losses["chunked"], rtol=1e-2, atol=1e-2)
    grads = {kind: segment.head.proj.weight.grad for kind, segment in segments.items()}
    torch.testing.assert_close(grads["fused"], grads["chunked"], rtol=2e-2, atol=2e-4)
