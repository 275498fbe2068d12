"""Packed examples never see each other: on each example's tokens, the split model gives exactly the logits the HF
model gives that example alone (block-diagonal causal mask, positions restarting at 0), for every covered family."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from segprop_ray.core.blocks import CONTEXT, PAD, TARGET, TokenBlocks, prediction_index
from segprop_ray.core.packing import Example, ExamplePacker
from segprop_ray.core.parts import ModelParts, SegmentSpec
from segprop_ray.core.weights import SafetensorsSource

VOCAB, SEQ_LEN = 101, 24
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "qwen3": dict(num_key_value_heads=2, head_dim=8),
    "mistral": dict(num_key_value_heads=2, sliding_window=3),  # a window shorter than the examples and the block
    "gpt2": None,  # learned absolute positions
}


def tiny_model(tmp_path, family: str, attn: str):
    if family == "gpt2":
        config = AutoConfig.for_model("gpt2", vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:
        config = AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=64,
                                      **FAMILIES[family])
    config._attn_implementation = attn
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path)
    return model


def examples(lengths: list[int], seed: int = 0) -> list[Example]:
    gen = torch.Generator().manual_seed(seed)
    return [Example(torch.randint(3, VOCAB, (n,), generator=gen).tolist(), [CONTEXT] + [TARGET] * (n - 1))
            for n in lengths]


def packed(items: list[Example]) -> tuple[TokenBlocks, list[list[Example]]]:
    """The blocks the packer makes of ``items``, and which examples each block holds, in order."""
    packer = ExamplePacker(SEQ_LEN, pad_id=0)
    blocks = list(packer.add(items)) + list(packer.finish())
    rows = torch.tensor([[b.ids, b.positions, b.kinds] for b in blocks])  # (N, 3, T)
    contents = []
    for block in blocks:
        starts = [t for t, p in enumerate(block.positions) if p == 0] + [block.kinds.index(PAD) if PAD in block.kinds
                                                                         else SEQ_LEN]
        contents.append([next(e for e in items if e.ids == block.ids[a:b]) for a, b in zip(starts, starts[1:])])
    return TokenBlocks(rows[:, 0], rows[:, 1], rows[:, 2].to(torch.uint8)), contents


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_each_packed_example_gets_the_logits_it_gets_alone(tmp_path, family, attn):
    model = tiny_model(tmp_path, family, attn)
    source = SafetensorsSource.from_model_dir(tmp_path)
    parts = ModelParts(model.config)
    whole = parts.segment(SegmentSpec([(i, source) for i in range(parts.num_layers)], source, source)).eval()
    blocks, contents = packed(examples([9, 7, 4, 11, 6, 5, 8]))
    assert len(blocks) < 7 and any(len(c) >= 3 for c in contents)  # several examples share a block
    with torch.no_grad():
        logits = whole.logits(blocks.input_ids, position_ids=blocks.position_ids)  # (N, T, V)
        for row, held in enumerate(contents):
            start = 0
            for example in held:
                alone = model(torch.tensor([example.ids])).logits[0]  # (L, V)
                got = logits[row, start : start + len(example)]
                torch.testing.assert_close(got, alone, rtol=0, atol=2e-5)
                start += len(example)


def test_loss_counts_only_targets_and_never_crosses_examples():
    blocks, contents = packed(examples([9, 7, 4, 11, 6, 5, 8], seed=1))
    index = prediction_index(blocks.token_kind)  # (N,) flat b*T + t: position t predicts t+1
    t = index % SEQ_LEN
    rows = index // SEQ_LEN
    assert torch.equal(blocks.position_ids[rows, t + 1], blocks.position_ids[rows, t] + 1)  # same example
    assert len(index) == sum(len(e) - 1 for held in contents for e in held)  # every token but each example's first


def test_a_transformers_too_old_for_packed_masks_is_refused_in_one_line(tmp_path, monkeypatch):
    """Before 4.54 transformers' masks ignore packed position_ids: packed examples would see each other silently."""
    from segprop_ray.core import hf_compat
    from segprop_ray.core.hf_compat import MIN_TRANSFORMERS, check_transformers_version

    for version in ("4.57.3", "4.60.0", "5.0.0rc1", "5.23.0"):
        check_transformers_version(version)
    message = ("transformers 4.53.2 is older than 4.57, which segprop_ray needs (its masks would let packed examples "
               "attend to each other): pip install 'transformers>=4.57'")
    with pytest.raises(RuntimeError) as refused:
        check_transformers_version("4.53.2")
    assert str(refused.value) == message and MIN_TRANSFORMERS == "4.57"

    model = tiny_model(tmp_path, "llama", "sdpa")
    source = SafetensorsSource.from_model_dir(tmp_path)
    whole = ModelParts(model.config).segment(SegmentSpec([(0, source)], source, source)).eval()
    blocks, _ = packed(examples([9, 7, 4]))
    monkeypatch.setattr(hf_compat, "transformers_version", lambda: "4.53.2")
    with pytest.raises(RuntimeError) as refused, torch.no_grad():
        whole.logits(blocks.input_ids, position_ids=blocks.position_ids)
    assert str(refused.value) == message


def test_rows_with_the_same_positions_share_one_rotary_table_and_packed_rows_keep_their_own():
    import torch

    from segprop_ray.core.stack import shared_positions

    plain = torch.arange(6).repeat(3, 1)  # (3, 6): one sequence per block
    assert shared_positions(plain).shape == (1, 6) and torch.equal(shared_positions(plain)[0], plain[0])
    packed = plain.clone()
    packed[1, 3:] = torch.arange(3)  # row 1 holds two examples
    assert shared_positions(packed) is packed
    assert shared_positions(plain[:1]) is not None and shared_positions(plain[:1]).shape == (1, 6)
