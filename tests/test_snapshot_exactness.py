"""SnapCheck with the real layer runner: S[q] built incrementally through the shards equals f^[0:q](x)
computed from scratch, on file:// and on s3:// alike.

fp32 snapshots: the same bits. bf16 snapshots: exactly the scratch chain rounded to bf16 after every
stored depth (that rounding is the only difference), and within bf16 rounding of the fp32 chain.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from helpers import corpus_blocks, tiny_model_dir
from segprop_ray.core.iteration import snapshot_cast
from segprop_ray.core.parts import ModelParts
from segprop_ray.core.plan import snapshot_spec
from segprop_ray.core.weights import SafetensorsSource
from segprop_ray.storage.reader import sequential_reader
from segprop_ray.storage.shard_format import ShardSpec
from segprop_ray.storage.shards import write_token_shards
from segprop_ray.storage.snapcheck import commit_depth, load_committed, transform_file

BASE, DEEPEST = 1, 4


def producer(parts, source, layers, embed):
    return parts.segment(snapshot_spec(layers, source, embed)).eval()


def build_depths(layout, parts, source, ids, spec, dtype):
    """Tokens, then S[BASE] from them, then S[q] = f_q(S[q-1]) file by file through the storage."""
    commit_depth(layout, "train", None, write_token_shards(layout, "train", ids, spec), "tokens", spec)
    for depth in range(BASE, DEEPEST + 1):
        first = depth == BASE
        module = producer(parts, source, list(range(BASE + 1)) if first else [depth], embed=first)

        @torch.no_grad()
        def apply(rows, module=module):
            hidden = rows.get("hidden")
            return snapshot_cast(module(rows["input_ids"], None if hidden is None else hidden.float(),
                                        rows["position_ids"]), dtype)

        infos = [transform_file(layout, "train", i, source_depth=None if first else depth - 1, depth=depth, fn=apply,
                                spec=spec) for i in range(spec.num_files(len(ids)))]
        commit_depth(layout, "train", depth, infos, f"weights-{depth}", spec)
    marker = load_committed(layout, "train", DEEPEST, f"weights-{DEEPEST}", len(ids), spec)
    return torch.cat([batch["hidden"] for batch in sequential_reader(layout, marker, batch_size=5)])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_incremental_snapshot_equals_scratch_forward(run_layout, tmp_path, dtype):
    model_dir = tiny_model_dir(tmp_path, "llama", 6)
    parts, source = ModelParts(AutoConfig.from_pretrained(model_dir)), SafetensorsSource.from_model_dir(model_dir)
    ids = corpus_blocks(20, 16)
    spec = ShardSpec.for_snapcheck(16, parts.config.hidden_size, dtype, rows_per_group=4, groups_per_file=2)

    stored = build_depths(run_layout, parts, source, ids, spec, dtype)  # (N, T, H)

    with torch.no_grad():
        scratch = producer(parts, source, list(range(DEEPEST + 1)), embed=True)(ids)  # f^[0:q](x), fp32
        if dtype == "fp32":
            assert stored.dtype == torch.float32 and torch.equal(stored, scratch)
            return
        chained = snapshot_cast(producer(parts, source, list(range(BASE + 1)), embed=True)(ids), "bf16")
        for depth in range(BASE + 1, DEEPEST + 1):
            chained = snapshot_cast(producer(parts, source, [depth], embed=False)(ids, chained.float()), "bf16")
    assert stored.dtype == torch.bfloat16 and torch.equal(stored.view(torch.int16), chained.view(torch.int16))
    torch.testing.assert_close(stored.float(), scratch, rtol=2 ** -6, atol=2 ** -6)
