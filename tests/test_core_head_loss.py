"""The chunked LM-head loss equals the plain one, in value and gradients, and keeps no logits for backward."""

import pytest
import torch
import torch.nn.functional as F

from segprop_ray.core.head_loss import chunk_tokens_for, linear_cross_entropy
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.weights import SafetensorsSource
from tests.test_core_split import tiny_hf_model

N, H, V = 37, 16, 101  # 37 tokens: no chunk size below divides it evenly


def leaves(bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=gen, requires_grad=True)
    weight = (torch.randn(V, H, generator=gen) * 0.3).requires_grad_()
    b = (torch.randn(V, generator=gen) * 0.1).requires_grad_() if bias else None
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, b, targets


def loss_and_grads(fn, hidden, weight, bias, targets, scale=0.25):
    loss = fn(hidden, weight, bias, targets)
    (loss * scale).backward()  # a scaled loss, as with gradient accumulation
    grads = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    return loss.detach(), grads


def plain(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets)


@pytest.mark.parametrize("chunk", [1, 5, N, 1000, None])
@pytest.mark.parametrize("bias", [True, False])
def test_fp32_loss_and_gradients_equal_plain_cross_entropy(chunk, bias):
    tensors = leaves(bias)
    expected, expected_grads = loss_and_grads(plain, *tensors)
    got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=chunk), *tensors)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_bf16_autocast_matches_plain_autocast_arithmetic():
    """Under autocast both run the matmuls in bf16 and the softmax in fp32: equal up to bf16 rounding."""
    tensors = leaves()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(plain, *tensors)
        got, got_grads = loss_and_grads(lambda *a: linear_cross_entropy(*a, chunk_tokens=8), *tensors)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads):
        assert g.dtype == e.dtype
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-4)


def test_without_grad_gives_the_same_loss_and_no_graph():
    hidden, weight, bias, targets = leaves()
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens=4)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, plain(hidden, weight, bias, targets).detach(), rtol=1e-6, atol=1e-6)


def test_frozen_weight_gets_no_gradient_and_hidden_still_does():
    hidden, weight, bias, targets = leaves()
    weight.requires_grad_(False)
    linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens=4).backward()
    assert weight.grad is None and hidden.grad is not None and bias.grad is not None


def test_default_chunk_is_one_gib_of_fp32_logits():
    assert chunk_tokens_for(128_256) == 2_092
    assert chunk_tokens_for(10**12) == 1


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``fn`` runs (parameters included)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_segment_loss_equals_hf_loss_and_saves_no_logits(tmp_path):
    """A head segment's loss is the HF model's ``labels=`` loss; backward keeps nothing of size tokens x vocab."""
    model = tiny_hf_model(tmp_path, "llama", "sdpa")
    source = SafetensorsSource.from_model_dir(tmp_path)
    parts = ModelParts(model.config)
    layers = [(i, source) for i in range(parts.num_layers)]
    segment = parts.segment(SegmentSpec(layers=layers, embed_source=source, head_source=source))
    segment.loss_chunk_tokens = 5
    ids = torch.randint(0, 101, (3, 12))
    expected = model(ids, labels=ids).loss
    expected.backward()
    loss = segment(ids)
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    hf_grad = model.lm_head.weight.grad
    torch.testing.assert_close(segment.head.proj.weight.grad, hf_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(segment.embedder.tokens.weight.grad, model.model.embed_tokens.weight.grad,
                               rtol=1e-5, atol=1e-7)

    hidden = torch.randn(3, 12, 32, requires_grad=True)
    exit_model = parts.segment(SegmentSpec(layers=[], head_source=source))
    logits_bytes = 3 * 11 * 101 * 4
    plain_saved = saved_bytes(lambda: F.cross_entropy(
        exit_model.head(hidden)[:, :-1].float().reshape(-1, 101), ids[:, 1:].reshape(-1)))
    chunked_saved = saved_bytes(lambda: exit_model(ids, hidden))
    assert plain_saved - chunked_saved >= logits_bytes  # the probe sees the plain loss's fp32 logits
    assert chunked_saved < logits_bytes


def test_a_second_backward_is_refused():
    hidden, weight, bias, targets = leaves()
    loss = linear_cross_entropy(hidden, weight, bias, targets, chunk_tokens=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated once"):
        loss.backward()


@pytest.mark.parametrize("math", [dict(multiplier=0.0625), dict(divisor=8.0), dict(softcap=3.0),
                                  dict(multiplier=2.5, softcap=2.0)])
@pytest.mark.parametrize("chunk", [5, None])
def test_family_logit_math_is_applied_and_differentiated(math, chunk):
    """Cohere's multiplier, Granite's divisor, Gemma's soft-cap: the chunked loss and its gradients equal autograd
    through HF's order of operations (scale, then cap * tanh(logits / cap)), with a sum over N / normalizer."""
    from segprop_ray.core.head_loss import LogitMath

    logit_math = LogitMath(**math)

    def reference(hidden, weight, bias, targets):
        logits = F.linear(hidden, weight, bias).float()
        if "multiplier" in math:
            logits = logits * math["multiplier"]
        if "divisor" in math:
            logits = logits / math["divisor"]
        if "softcap" in math:
            logits = torch.tanh(logits / math["softcap"]) * math["softcap"]
        return F.cross_entropy(logits, targets, reduction="sum") / 50.0

    def chunked(hidden, weight, bias, targets):
        return linear_cross_entropy(hidden, weight, bias, targets, chunk, normalizer=50.0, logit_math=logit_math)

    expected, expected_grads = loss_and_grads(reference, *leaves())
    got, grads = loss_and_grads(chunked, *leaves())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
