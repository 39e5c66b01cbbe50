#!/usr/bin/env bash
# The training-throughput benchmark (bench/bench_training.py) on a lent GPU: model alone, input
# pipeline alone and the two together, Keras on JAX (the box has no TensorFlow), the full-width
# recipes (--full), float32 beside mixed float16, the pipeline's workers from the cores (auto).
# Not run yet (written 2026-12-04 without a lent GPU); the CPU table is bench/results/training.md.
#
#   here:    python3 bench/device/pack.py                                   # .whl/ + CRCHistoPhenotypes
#            python3 bench/device/pack.py --dataset dsb2018/stage1_train    # + DSB for U-Net (unverified: may
#                                                                           #   pass the 64 MiB carry limit;
#                                                                           #   then pack it alone for a 2nd call)
#   device:  run(command="bash bench/device/bench_training_gpu.sh", carry=[".whl", "device_data"], timeout_s=580)
#
# XLA compilation dominates such a call (DCRN's first epoch compiled for 95-140 s on an H200, once per
# precision here): if LIMIT cuts the run, the rows measured so far are in $OUT; run the rest as
# FAMILIES=dcrn PRECISION=mixed_float16 ... in a second call.
# Families default to those whose data came along (udnet,dcrn with CRCHistoPhenotypes; unet with DSB).
# Rows are written to $OUT/training_gpu.{md,json} after each one, so a run cut by the time limit
# still returns what it measured. Override: FAMILIES, MEASURE_SECONDS (per measurement), REPEATS, PRECISION,
# WORKERS, LIMIT (seconds for the whole benchmark) and EXTRA (further flags). A dry run here:
#   OUT=runs/tmp_gpu_dry FAMILIES=dcrn MEASURE_SECONDS=1 REPEATS=1 EXTRA="--data-root ../shared/data" bash bench/device/bench_training_gpu.sh
set -u
OUT=${OUT:-runs/device_out}
mkdir -p "$OUT"
python3 -c "import keras" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/*.whl
DEFAULT_FAMILIES=""
for dataset in crchistophenotypes dsb2018/stage1_train; do
  [ -d "device_data/$dataset/webp" ] || continue
  python3 bench/device/pack.py --unpack --dataset "$dataset" || exit 1
  case $dataset in
    crchistophenotypes) DEFAULT_FAMILIES="$DEFAULT_FAMILIES,udnet,dcrn" ;;
    dsb2018/*) DEFAULT_FAMILIES="unet$DEFAULT_FAMILIES" ;;
  esac
done
FAMILIES=${FAMILIES:-${DEFAULT_FAMILIES#,}}
[ -n "$FAMILIES" ] || { echo "bench_training_gpu: no packed data in device_data/ (run bench/device/pack.py)"; exit 1; }
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
timeout "${LIMIT:-540}" python3 bench/bench_training.py --full --families "$FAMILIES" \
    --precision "${PRECISION:-float32,mixed_float16}" --workers "${WORKERS:-auto}" \
    --seconds "${MEASURE_SECONDS:-4}" --repeats "${REPEATS:-3}" --data-root device_data \
    --results "$OUT" --name training_gpu ${EXTRA:-} 2> "$OUT/training_gpu.log"
status=$?
echo "bench_training: exit $status"
tail -n 30 "$OUT/training_gpu.log"
cat "$OUT/training_gpu.md" 2>/dev/null
exit $status
