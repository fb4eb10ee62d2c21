#!/usr/bin/env bash
# Set up a fresh Linux machine: Qt/X11 system libraries and a virtual display (for napari and
# its tests, when run as root or with sudo), then ./.venv with the package and test tools.
# torch/torchvision are pinned first so pip reuses builds already on disk where there are some,
# instead of resolving the newest CUDA build for timm and segmentation-models-pytorch.
set -euo pipefail
cd "$(dirname "$0")/.."

system_packages=(xvfb xauth libxcb-icccm4 libxcb-keysyms1 libxcb-xinerama0 libxcb-xinput0
  libxcb-image0 libxcb-render-util0 libxcb-randr0 libxcb-shape0 libxkbcommon-x11-0
  libxcb-cursor0 libegl1 libgl1 libdbus-1-3 libfontconfig1)
if command -v apt-get >/dev/null 2>&1 && ! dpkg -s "${system_packages[@]}" >/dev/null 2>&1; then
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
  if [ "$(id -u)" -eq 0 ] || [ -n "$sudo_cmd" ]; then
    echo "Installing system packages for Qt and a virtual display..." >&2
    $sudo_cmd apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq "${system_packages[@]}" >/dev/null
  else
    echo "Note: cannot install ${system_packages[*]} without root; GUI tests need them." >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
# [fast]: ONNX Runtime and OpenVINO for CPU prediction (--engine); optional, on by default.
python -m pip install -q -e ".[testing,fast]"
echo "Installed: $(command -v histo-wsss)" >&2
