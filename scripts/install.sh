#!/usr/bin/env bash
# Installs everything largewave needs on a Debian machine: the Debian packages (as root) and the
# Python packages (torch pinned to the CPU build first, then the project in editable mode).
# Idempotent: a stamp under .cache/ skips the work when nothing it depends on has changed.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Debian packages: FluidSynth + a sampled piano soundfont render the demo corpus; curl is WebDataset's
# reader of http(s) shards.
APT_PACKAGES=(fluidsynth musescore-general-soundfont-lossless curl)
# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
TORCH_SPEC=${LARGEWAVE_TORCH:-torch==2.13.0}

stamp=.cache/install.stamp
want=$(cat setup.py scripts/install.sh | sha256sum | cut -c1-16)-$($PYTHON -c 'import sys; print(sys.executable)' | sha256sum | cut -c1-8)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]] && $PYTHON -c 'import largewave, torch, deepspeed, webdataset' 2>/dev/null; then
  exit 0
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    echo "[install] apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 || {
      apt-get update -q >/dev/null
      apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
    }
  else
    echo "[install] WARNING: missing Debian packages ${missing[*]} (needed to render the demo piano corpus)."
    echo "[install]          Install them as root: apt-get install --no-install-recommends ${missing[*]}"
  fi
fi

echo "[install] pip install $TORCH_SPEC, then largewave[dev]"
$PYTHON -m pip install -q --disable-pip-version-check "$TORCH_SPEC"
$PYTHON -m pip install -q --disable-pip-version-check -e ".[dev]"
mkdir -p .cache && echo "$want" > "$stamp"
echo "[install] done"
