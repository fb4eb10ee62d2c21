#!/usr/bin/env bash
# Create ./.venv with the package and its test dependencies.
# torch/torchvision are pinned first so pip takes the builds already on this machine's disk
# (elsewhere it downloads them) instead of resolving a newer CUDA build for timm/smp.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
python -m pip install -q -e ".[testing]"
