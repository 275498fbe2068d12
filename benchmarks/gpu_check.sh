#!/usr/bin/env bash
# GPU check of the training-step benchmark (issue 7): the project's workers vs the reference loops,
# on the same card, in one call. Meant for the device machine (no Ray there, and none needed).
#
# Run from the repository root, in ONE device call (about 4-8 minutes for the two default shapes; each shape is capped;
# first a 1-minute comparison of the plain and the chunked LM-head loss):
#   bash benchmarks/gpu_check.sh                      # llama1b, then mistral7b_12l
#   bash benchmarks/gpu_check.sh mistral7b            # full 32-layer 7B shape, batch 1 (a separate call)
# with the device tool: run(command="bash benchmarks/gpu_check.sh", kind="nvidia-h200", timeout_s=600,
#                            carry=[".whl", ".reference"])
#
# The reference loops (gpu_reference_loops.py of ../shared/reference) are not in the repository, and ../shared does
# not travel to the device machine (only the repository does). Before the call, here, copy them into the
# git-ignored .reference/ that `carry` takes along:
#   rm -rf .reference && cp -r ../shared/reference .reference
# The benchmark loads them from $SEGPROP_REFERENCE_DIR, else ../shared/reference, else .reference/.
#
# Before the call, on the CPU machine (the device image has torch, transformers, safetensors, pyarrow,
# fsspec and PyYAML, but was not seen with pydantic, which segprop_ray.config needs):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 typing_inspection==0.4.5 \
#     typing_extensions==4.16.0
# (.whl/ is in .gitignore, so only carry=[".whl"] takes it to the device.)
# The script installs .whl/*.whl (if any, and only if pydantic is missing) into /tmp/site first, and stops early,
# naming what is missing, if an import fails. Output: a short table per shape on stdout; JSON + log per shape in $OUT.
#
# Dry run on a CPU machine (tests/test_bench_smoke.py does this, so a broken script is found before a device call):
#   DEVICE=cpu HEAD_SHAPE=cpu_small BENCH_ARGS="--seq 32 --batch 2 --steps 1" bash benchmarks/gpu_check.sh tiny
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/segprop-gpu-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}              # cpu: a dry run of this script
# the LM-head shape of bench_head_loss.py: llama1b with the default shapes; none (skipped) when shapes are named,
# so that `gpu_check.sh mistral7b` fits one 600 s call
if [ $# -eq 0 ]; then HEAD_SHAPE=${HEAD_SHAPE:-llama1b}; else HEAD_SHAPE=${HEAD_SHAPE:-none}; fi
read -r -a BENCH_EXTRA <<< "${BENCH_ARGS:-}"   # more segprop_bench.py options, for dry runs
WORK=${BENCH_WORK:-$PWD/.segprop-bench-work}   # on the machine's disk (not /tmp, which may be memory)
export PYTHONUNBUFFERED=1 SEGPROP_CACHE="$WORK/cache"
if [ -z "${SEGPROP_REFERENCE_DIR:-}" ] && [ ! -f ../shared/reference/gpu_reference_loops.py ] \
    && [ -f .reference/gpu_reference_loops.py ]; then
  export SEGPROP_REFERENCE_DIR=$PWD/.reference   # carried in by the device call
fi
mkdir -p "$OUT"

PYDANTIC_OK='import pydantic, sys; sys.exit(tuple(map(int, pydantic.VERSION.split(".")[:2])) < (2, 7))'
if ! "$PY" -c "$PYDANTIC_OK" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then  # missing, or older than 2.7
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

DEVICE=$DEVICE "$PY" - <<'EOF' || exit 3
import importlib, importlib.util, os, sys
need = ["torch", "transformers", "safetensors", "pyarrow", "fsspec", "yaml", "pydantic"]
missing = [m for m in need if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing} (see the header of benchmarks/gpu_check.sh)")
try:
    if importlib.util.find_spec("ray") is not None:
        print("note: ray is importable here; the benchmark does not use it")
except ImportError:  # hidden on purpose (the dry-run test)
    pass
sys.path.insert(0, "benchmarks")
import bench_setup  # a one-line exit naming where it looked when the reference loops are not found
print("reference loops:", bench_setup.reference_dir())
import torch, transformers, pyarrow
print(f"torch {torch.__version__}, transformers {transformers.__version__}, pyarrow {pyarrow.__version__}, "
      f"cuda {torch.cuda.is_available()} {torch.cuda.get_device_name() if torch.cuda.is_available() else ''}")
sys.exit(0 if torch.cuda.is_available() or os.environ["DEVICE"] == "cpu" else "no CUDA device")
EOF
mkdir -p "$WORK" && trap 'rm -rf "${WORK:?}"' EXIT
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/nvidia-smi.csv"
fi
df -hT "$WORK" | tail -1

status=0
if [ "$HEAD_SHAPE" != none ]; then
  echo "=== LM-head loss: plain vs chunked ($HEAD_SHAPE head) ==="
  timeout -k 10 60 "$PY" benchmarks/bench_head_loss.py --device "$DEVICE" --shape "$HEAD_SHAPE" \
    --out "$OUT/head_loss.$HEAD_SHAPE.$DEVICE.json" 2>&1 | grep -v -e USDT -e FutureWarning | tee "$OUT/head_loss.$HEAD_SHAPE.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "head loss: exit $rc"; status=1; }
fi

SHAPES=("$@")
[ ${#SHAPES[@]} -eq 0 ] && SHAPES=(llama1b mistral7b_12l)
for shape in "${SHAPES[@]}"; do
  case $shape in
    llama1b)       limit=${LLAMA1B_LIMIT:-260}; extra=() ;;
    mistral7b_12l) limit=230; extra=(--no-ref-depth-scaling) ;;
    mistral7b)     limit=500; extra=(--no-ref-depth-scaling) ;;
    *)             limit=300; extra=() ;;
  esac
  echo "=== $shape (limit ${limit}s) ==="
  timeout -k 15 "$limit" "$PY" benchmarks/segprop_bench.py --device "$DEVICE" --shape "$shape" "${extra[@]}" \
    "${BENCH_EXTRA[@]}" --work-dir "$WORK/$shape" --out "$OUT/segprop_bench.$shape.$DEVICE.json" 2>&1 \
    | grep --line-buffered -v -e FutureWarning -e 'warnings.warn' | tee "$OUT/segprop_bench.$shape.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && { echo "$shape: exit $rc (the JSON holds the records made before it stopped)"; status=1; }
  rm -rf "${WORK:?}/$shape"
done
exit $status
