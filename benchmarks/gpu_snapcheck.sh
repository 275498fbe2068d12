#!/usr/bin/env bash
# GPU check of SnapCheck (issue 17): the snapshot job's writes and the shard reader against the steps they serve,
# at the 1B and the 7B-layer shapes, on the machine's local disk and on S3 (moto's server on loopback), in ONE
# device call of about 8 minutes (each step has its own time cap; the whole stays under 600 s).
#
#   1. segprop_bench.py --device cuda, per shape (llama1b, mistral7b_12l; 4 x 2048 tokens, bf16 autocast): snap_write
#      (one file at a time, then 2 at once: resources.snapshot.files_per_actor), read_shards, lw_snap and seg_snap,
#      with the reference loops' snap_write_1layer_d2h, lw_snap and seg_snap in the same process: snapshot tokens/s
#      against the segment worker's training tokens/s and the reference's one-layer forward, bytes/s of shards
#      written, the reader's GB/s against each step's need, the lw_snap / seg_snap read-wait share.
#   2. shard_io.py at both shapes' rows (seq 2048, hidden 2048 and 4096): Parquet shard writes and reads against a raw
#      copy of the same bytes, local disk and S3 through moto, one run each.
#
# Before the call, here, from the repository root (both folders are git-ignored and travel only through `carry`):
#   rm -rf .reference && cp -r ../shared/reference .reference   # the reference loops: ../shared does not travel
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 typing_extensions==4.16.0 \
#     s3fs==2026.9.0 fsspec==2026.9.0 aiobotocore==3.10.0 botocore==1.43.117 aioitertools==0.13.0 jmespath==1.1.0 \
#     boto3==1.43.117 s3transfer==0.19.3 moto==5.2.5 xmltodict==1.0.4 responses==0.26.3 cryptography==50.0.2 \
#     cffi==2.1.1 pycparser==3.12 Flask==3.1.3 flask-cors==6.0.5 blinker==1.9.0 itsdangerous==2.2.0   # about 31 MB
# Device call:
#   run(command="bash benchmarks/gpu_snapcheck.sh", kind="nvidia-h200", timeout_s=600, carry=[".whl", ".reference"])
# Then copy $OUT's JSON files into benchmarks/results/ and fill in BENCHMARKS.md, "SnapCheck on the GPU".
#
# Dry run on a CPU machine (tests/test_bench_smoke.py runs it):
#   DEVICE=cpu SHAPES=tiny BENCH_ARGS="--seq 32 --batch 2 --steps 1 --warmup 1" IO_ARGS="--seq 64 --total-mb 8" \
#     bash benchmarks/gpu_snapcheck.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/segprop-gpu-snapcheck}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
read -r -a SHAPES <<< "${SHAPES:-llama1b mistral7b_12l}"
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"
read -r -a IO_EXTRA <<< "${IO_ARGS:-}"
WORK=${BENCH_WORK:-$PWD/.segprop-bench-work}   # on the machine's disk (not /tmp, which may be memory)
export PYTHONUNBUFFERED=1 SEGPROP_CACHE="$WORK/cache"
if [ -z "${SEGPROP_REFERENCE_DIR:-}" ] && [ ! -f ../shared/reference/gpu_reference_loops.py ] \
    && [ -f .reference/gpu_reference_loops.py ]; then
  export SEGPROP_REFERENCE_DIR=$PWD/.reference   # carried in by the device call
fi
mkdir -p "$OUT"

S3_OK='import s3fs, moto, flask, boto3'
if ! "$PY" -c "$S3_OK; import pydantic" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
"$PY" -c "import torch, transformers, pyarrow, pydantic, yaml; import sys; sys.path.insert(0, 'benchmarks'); \
import bench_setup; print('reference loops:', bench_setup.reference_dir()); \
print('torch', torch.__version__, 'pyarrow', pyarrow.__version__, 'cuda', torch.cuda.is_available())" || exit 3
TARGETS=local,s3
"$PY" -c "$S3_OK" 2>/dev/null || { echo "note: s3fs/moto not importable: local disk only"; TARGETS=local; }
mkdir -p "$WORK" && trap 'rm -rf "${WORK:?}"' EXIT
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
df -hT "$WORK" | tail -1

status=0
step() {  # step NAME LIMIT_S COMMAND...: run with a time cap; all output also in $OUT/gpu_snapcheck.log (8 files come back)
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s, load $(cut -d' ' -f1 /proc/loadavg)) ==="
  timeout -k 15 "$limit" "$@" 2>&1 | grep --line-buffered -v -e FutureWarning -e 'warnings.warn' | tee -a "$OUT/gpu_snapcheck.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "$name: exit $rc"; status=1; }
}
for shape in "${SHAPES[@]}"; do
  common=(benchmarks/segprop_bench.py --device "$DEVICE" --shape "$shape" --no-depth-scaling --no-ref-depth-scaling
          "${BENCH_EXTRA[@]}")
  step "snapcheck.$shape" 150 "$PY" "${common[@]}" --variants snap_write,read_shards,lw_snap,seg_snap \
    --reference-variants snap_write,lw_snap,seg_snap --work-dir "$WORK/$shape" --out "$OUT/snapcheck.$shape.$DEVICE.json"
  rm -rf "${WORK:?}/$shape"
  step "snapcheck2.$shape" 60 "$PY" "${common[@]}" --variants snap_write --reference-variants '' --snap-files 2 \
    --work-dir "$WORK/$shape" --out "$OUT/snapcheck2.$shape.$DEVICE.json"
  rm -rf "${WORK:?}/$shape"
done
for hidden in 2048 4096; do
  step "shard_io.h$hidden" 45 "$PY" benchmarks/shard_io.py --seq 2048 --hidden "$hidden" --total-mb 512 --repeats 1 \
    --targets "$TARGETS" --dir "$WORK" "${IO_EXTRA[@]}" --json "$OUT/shard_io.h$hidden.$DEVICE.json"
done
exit $status
