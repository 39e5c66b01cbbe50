#!/usr/bin/env bash
# UD-Net (detection) and DCRN (classification) on CRCHistoPhenotypes, trained at once on one lent GPU
# with Keras on JAX (that box has no TensorFlow), mixed float16 (--precision auto), the papers'
# full-width configs, each stopped by --time-budget. Export and int8 checks then run on a CPU machine
# from the returned model.keras files (python3 bench/bench_tflite.py --run ...).
#
#   here:    python3 bench/device/pack.py
#   device:  run(command="bash bench/device/train_crchisto.sh 6", carry=[".whl", "device_data"])
#
# Each run folder is tarred (in 12 MiB parts) into $OUT as soon as its job ends, so one that finishes comes back even
# if the other does not. EXTRA adds flags to both (a dry run here: EXTRA="--epochs 1 --steps-per-epoch 2").
set -u
MINUTES=${1:-6}
OUT=${OUT:-runs/device_out}
mkdir -p "$OUT" runs/device
python3 -c "import keras" 2>/dev/null || python3 -m pip install -q --no-index --no-deps .whl/*.whl
python3 bench/device/pack.py --unpack || exit 1
export KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
DATA=crchisto:device_data/crchistophenotypes
LIMIT=$(python3 -c "print(int($MINUTES * 60 + 150))")  # budget + compile + final evaluation

train() {  # name config [flags...]
  local name=$1 config=$2; shift 2
  timeout "$LIMIT" python3 -m training.fit --config "$config" --data "$DATA" --time-budget "$MINUTES" \
      --workers 6 --out "runs/device/$name" --overwrite ${EXTRA:-} "$@" > "runs/device/$name.log" 2>&1
  echo "$name: exit $?"
  tail -n 25 "runs/device/$name.log"
  cp "runs/device/$name.log" "$OUT/"
  # files over 16 MiB do not come back from the device: parts of 12 MiB (cat NAME.tgz.* | tar xzf -)
  [ -d "runs/device/$name" ] && tar czf - -C runs/device "$name" | split -b 12m - "$OUT/$name.tgz."
}

train udnet_crchisto configs/udnet_crchisto.json &
train dcrn_crchisto configs/dcrn_crchisto.json &
wait
ls -la "$OUT"
