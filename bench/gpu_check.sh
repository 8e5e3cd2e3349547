#!/usr/bin/env bash
# The GPU checks, as one short script for a machine with a CUDA GPU (run from the project root
# after scripts/install.sh): mixed precision on the GPU end to end, then the throughput benchmark.
#   bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name())"
DATA=$(mktemp -d)
$PY - "$DATA" <<'PY'
import sys
from pathlib import Path
sys.path.insert(0, ".")
from bench.datasets import photo_folder
photo_folder(Path(sys.argv[1]), 512, 128)
PY
for mp in bf16 fp16 no; do   # each precision trains and evaluates on the GPU
  $PY train.py --data "$DATA" --model resnet18 --weights none --epochs 2 --mixed-precision $mp \
    --output-dir "$DATA/run-$mp" | tail -n 3
  $PY eval.py --ckpt "$DATA/run-$mp/model.safetensors" --data "$DATA/test" --output-dir "$DATA/eval-$mp" | head -n 1
done
# Target: at least 3x the 1062 img/s of the classic chapter's 2-GPU run, JPEG decoding included;
# the chapter's batch of 128 first, then the CPU figure's 32.
for batch in 128 32; do
  $PY bench/throughput.py --images 4096 --epochs 3 --batch $batch --out "${OUT:-bench/out}/throughput-gpu-$batch.json"
done
