#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU, run from the project root:
# mixed precision on the GPU end to end (train.py then eval.py in bf16, fp16 and fp32), then the
# throughput benchmark there. Every step runs even when an earlier one fails (a GPU lease is short);
# the exit status says whether all passed. One log and the benchmark's JSON go to $OUT (else bench/out).
#   bash bench/gpu_check.sh                 # with the project's .venv, or else python3
#   PYTHON=/path/to/python bash bench/gpu_check.sh
#   SMOKE=1 bash bench/gpu_check.sh         # tiny sizes, any device: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
BUDGET=${BUDGET:-540}  # seconds for all steps: a device command may run 600
RESULTS=${OUT:-bench/out}
mkdir -p "$RESULTS"
LOG=$RESULTS/gpu_check.log
: >"$LOG"
export PYTHONUNBUFFERED=1
if [ "${SMOKE:-0}" = 1 ]; then
  TRAIN_IMAGES=16 EPOCHS=1 BENCH_IMAGES=32 BENCH_EPOCHS=1 BATCHES="16" IMAGE_SIZE=64 NEED_CUDA=False LOADER="--images 2 --rounds 1 --workers 0 --sets small"
else
  TRAIN_IMAGES=512 EPOCHS=2 BENCH_IMAGES=4096 BENCH_EPOCHS=3 BATCHES="128 32" IMAGE_SIZE=224 NEED_CUDA=True LOADER="--images 64 --rounds 3"
fi
failed=()

step() {  # step NAME COMMAND...: run it (4 minutes at most, within BUDGET), log it, note a failure, go on
  local name=$1; shift
  local left=$((BUDGET - SECONDS))
  echo "== $name: $*" | tee -a "$LOG"
  if [ "$left" -lt 15 ]; then
    echo "== $name FAILED (no time left of ${BUDGET}s)" | tee -a "$LOG"; failed+=("$name"); return
  fi
  timeout -k 10 $((left < 240 ? left : 240)) "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "== $name FAILED (exit $rc)" | tee -a "$LOG"; failed+=("$name"); }
}

# Everything the project imports: each package of requirements.txt, then the commands and benchmarks.
step env "$PYTHON" -c "import importlib, re, torch, torchvision, accelerate; \
names = {'pillow': 'PIL', 'pyyaml': 'yaml', 'scikit-image': 'skimage', 'scikit-learn': 'sklearn'}; \
reqs = [re.split('[<>=!~ ]', l.strip())[0] for l in open('requirements.txt') if l.strip() and not l.startswith('#')]; \
[importlib.import_module(names.get(r.lower(), r.replace('-', '_'))) for r in reqs]; \
[importlib.import_module(m) for m in ('finetune.commands.train', 'finetune.commands.eval', 'bench.throughput', 'bench.loader_speed')]; \
assert torch.cuda.is_available() or not $NEED_CUDA, 'no CUDA GPU'; \
print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', 'torch', torch.__version__, 'torchvision', torchvision.__version__, \
'accelerate', accelerate.__version__, '; imported', len(reqs), 'requirements')"
[ ${#failed[@]} -eq 0 ] || exit 1
# Loader workers pass batches through shared memory; a small /dev/shm would crash them.
step machine bash -c "nproc; df -h /dev/shm | tail -n 1; ulimit -n"

DATA=$(mktemp -d)
trap 'rm -rf "$DATA"' EXIT
step data "$PYTHON" -c "from pathlib import Path; \
from bench.datasets import photo_folder; photo_folder(Path('$DATA'), $TRAIN_IMAGES, $TRAIN_IMAGES // 4)"
for mp in bf16 fp16 no; do  # each precision trains and evaluates on the GPU
  step "train-$mp" "$PYTHON" train.py --data "$DATA" --model resnet18 --weights none --epochs $EPOCHS \
    --image-size $IMAGE_SIZE --mixed-precision "$mp" --output-dir "$DATA/run-$mp"
  step "eval-$mp" "$PYTHON" eval.py --ckpt "$DATA/run-$mp/model.safetensors" --data "$DATA/test" --mixed-precision "$mp" \
    --output-dir "$DATA/eval-$mp"
done

# Target: at least 3x the 1062 img/s of the classic chapter's 2-GPU run, JPEG decoding included;
# at the chapter's batch of 128, then at the CPU figure's 32.
for batch in $BATCHES; do
  step "throughput-$batch" "$PYTHON" -m bench.throughput --images $BENCH_IMAGES --epochs $BENCH_EPOCHS --batch "$batch" \
    --out "$RESULTS/throughput-gpu-$batch.json"
done

# The loader alone, on this host's cores (one core and all workers): what can feed the GPU, next
# to the training figures above.
step loader "$PYTHON" -m bench.loader_speed $LOADER --out "$RESULTS/loader_speed.json"

if [ ${#failed[@]} -gt 0 ]; then
  echo "failed: ${failed[*]}" | tee -a "$LOG"
  exit 1
fi
echo "all GPU checks passed" | tee -a "$LOG"
