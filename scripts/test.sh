#!/usr/bin/env bash
# Install everything the tests need on a fresh Debian machine, then run them.
#   bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: Fashion-MNIST for the default-recipe test, SLURM and munge for the cluster test,
# a font with Chinese and Japanese glyphs (7 MB) for the pictures' class names; Chromium and its
# WebDriver for the test of serve.py's page in a real browser.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  need=()
  for pkg in dataset-fashion-mnist slurmctld slurmd slurm-client munge fonts-droid-fallback chromium chromium-driver; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
  done
  if [ ${#need[@]} -gt 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

bash scripts/install.sh
.venv/bin/pip install -q -r requirements-test.txt
# Lint first (pyflakes, pycodestyle's errors, import order; pyproject.toml's [tool.ruff]): seconds.
.venv/bin/ruff check finetune tests bench docs ./*.py
exec .venv/bin/python -m pytest -q tests "$@"
