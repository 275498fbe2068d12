#!/usr/bin/env bash
# The moonshot figure, for a session with a GPU (issue 16): the peak GPU memory of every stage of a full SegProp pass
# at the full 32-layer Mistral-7B shape (hidden 4096, vocabulary 32,768; seq 2048, batch 1) under a 24 GiB
# per-process cap (torch.cuda.set_per_process_memory_fraction, as on a 24 GB card), against E2E's.
#
# Stages, each in a fresh process through the project's own workers (benchmarks/segment_bench.py), p = 1, r = 2:
#   stage1, stage1_8bit   Stage 1 (embeddings + layers 0..1 + LL + head), AdamW and bitsandbytes' 8-bit AdamW
#   snap_write            the snapshot job of one layer (S[2] from S[1], every file)
#   seg_k1 seg_k2 seg_k4  a Stage 2 segment of 1, 2, 4 layers + LL (every segment of a pass has the same shape)
#   sub_attn sub_mlp      the attention and MLP halves of one layer + LL
#   lora_seg lora_e2e     a LoRA segment; the LoRA e2e baseline (adapters on every layer)
#   e2e, e2e_uncapped     full fine-tuning under the cap (expected: out of memory, ~116 GB of weights, gradients
#                         and AdamW state) and without it (what E2E itself needs on the whole card)
# A stage that does not fit records its out-of-memory error. Output: segment_bench.mistral7b.cuda.json (+ .log) in $OUT.
#
# One device call (estimated 5-9 minutes, not measured: the 14.5 GB bf16 model is written first):
#   run(command="bash benchmarks/gpu_moonshot.sh", kind="nvidia-h200", timeout_s=600, carry=[".whl"])
# VARIANTS=... runs a subset (e.g. a second call for what a first one did not reach: the JSON keeps every
# finished stage). HEAD_LOSS=chunked|fused|auto (default auto: the fused kernel where liger-kernel imports) is every
# stage's training.head_loss. Before the call, on the CPU machine, the wheels the device image lacks into .whl/
# (pydantic for the config, peft for the LoRA stages, liger-kernel for the fused head loss, bitsandbytes for
# stage1_8bit; about 48 MB, under the 64 MiB a call carries; liger-kernel runs on the triton that CUDA torch brings):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
#     typing_extensions==4.16.0 peft==0.21.2 accelerate==1.16.0 psutil==7.2.2 \
#     liger-kernel==0.8.5 bitsandbytes==0.50.2
# Dry run on a CPU machine (tests/test_segment_bench_smoke.py does this):
#   DEVICE=cpu SHAPE=tiny CAP_GIB=0 BENCH_ARGS="--seq 32 --batch 2 --steps 1 --warmup 1" bash benchmarks/gpu_moonshot.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/segprop-moonshot}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
SHAPE=${SHAPE:-mistral7b}
CAP_GIB=${CAP_GIB:-24}
LIMIT=${LIMIT:-560}
HEAD_LOSS=${HEAD_LOSS:-auto}
VARIANTS=${VARIANTS:-stage1,snap_write,seg_k1,seg_k2,seg_k4,sub_attn,sub_mlp,lora_seg,lora_e2e,stage1_8bit,e2e,e2e_uncapped}
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:---steps 4 --warmup 2}"
WORK=${BENCH_WORK:-$PWD/.segprop-bench-work}   # on the machine's disk: the 7B model is 14.5 GB
export PYTHONUNBUFFERED=1 SEGPROP_CACHE="$WORK/cache"
mkdir -p "$OUT" "$WORK" && trap 'rm -rf "${WORK:?}"' EXIT

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, transformers, safetensors, pyarrow, fsspec, yaml, pydantic, peft" \
  || { echo "missing Python packages (see the header of benchmarks/gpu_moonshot.sh)"; exit 3; }
for optional in liger_kernel bitsandbytes; do  # the fused head loss and stage1_8bit; without them those rows say why
  "$PY" -c "import $optional" 2>/dev/null || echo "note: $optional does not import (see the header's wheel list)"
done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"

echo "=== $SHAPE: every stage under a ${CAP_GIB} GiB cap, head loss $HEAD_LOSS (limit ${LIMIT}s) ==="
timeout -k 15 "$LIMIT" "$PY" benchmarks/segment_bench.py --device "$DEVICE" --shape "$SHAPE" --cap-gib "$CAP_GIB" \
  --head-loss "$HEAD_LOSS" --repeats 1 --variants "$VARIANTS" "${BENCH_EXTRA[@]}" --work-dir "$WORK" \
  --out "$OUT/segment_bench.$SHAPE.$DEVICE.json" 2>&1 | grep --line-buffered -v -e FutureWarning -e 'warnings.warn' \
  | tee "$OUT/segment_bench.$SHAPE.log"
rc=${PIPESTATUS[0]}
[ "$rc" -ne 0 ] && echo "exit $rc (the JSON holds the stages measured before it stopped)"
exit "$rc"
