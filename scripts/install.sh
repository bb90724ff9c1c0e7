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
# torch first, pinned, and its variant chosen on purpose (a version pin alone does not choose CPU or
# CUDA on a stock machine):
#   LARGEWAVE_TORCH_VARIANT=auto (default) | cpu | cuda   auto: cuda where `nvidia-smi -L` lists a GPU
#   LARGEWAVE_TORCH_INDEX=URL   the wheel index to take torch from (overrides the variant's default)
#   LARGEWAVE_TORCH=SPEC        the whole requirement (default torch==2.13.0)
#   bash scripts/install.sh --print-torch   print the chosen variant and pip command, install nothing
TORCH_VERSION=2.13.0
TORCH_SPEC=${LARGEWAVE_TORCH:-torch==$TORCH_VERSION}
variant=${LARGEWAVE_TORCH_VARIANT:-auto}
reason="LARGEWAVE_TORCH_VARIANT=$variant"
if [[ $variant == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    variant=cuda; reason="nvidia-smi lists $(nvidia-smi -L | grep -c '^GPU') GPU(s)"
  else
    variant=cpu; reason="no NVIDIA GPU (nvidia-smi absent or lists none)"
  fi
fi
torch_args=()
case $variant in
  cpu)
    # The CPU build: from a configured source that holds it (pip's find-links, as on machines with
    # a local wheel), else from PyTorch's CPU index.
    if [[ -n ${LARGEWAVE_TORCH_INDEX:-} ]]; then
      torch_args=(--index-url "$LARGEWAVE_TORCH_INDEX" --extra-index-url https://pypi.org/simple)
    elif ! $PYTHON -m pip install --dry-run --no-index --no-deps -q "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1; then
      torch_args=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
    fi ;;
  cuda)
    # PyPI's Linux wheels are the CUDA build; LARGEWAVE_TORCH_INDEX picks another CUDA version's index
    # (e.g. https://download.pytorch.org/whl/cu126).
    if [[ -n ${LARGEWAVE_TORCH_INDEX:-} ]]; then torch_args=(--index-url "$LARGEWAVE_TORCH_INDEX"); fi ;;
  *) echo "[install] LARGEWAVE_TORCH_VARIANT must be auto, cpu or cuda, not '$variant'" >&2; exit 2 ;;
esac
torch_cmd=($PYTHON -m pip install -q --disable-pip-version-check "${torch_args[@]}" "$TORCH_SPEC")
if [[ ${1:-} == --print-torch ]]; then
  echo "variant: $variant ($reason)"
  echo "command: ${torch_cmd[*]}"
  exit 0
fi

stamp=.cache/install.stamp
want=$(cat setup.py scripts/install.sh constraints.txt | sha256sum | cut -c1-16)-$variant-$($PYTHON -c 'import sys; print(sys.executable)' | sha256sum | cut -c1-8)
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

echo "[install] torch: $variant build ($reason): ${torch_cmd[*]}"
"${torch_cmd[@]}"
# the project and its dependencies at the known-good versions of constraints.txt
echo "[install] pip install -e .[dev] -c constraints.txt"
$PYTHON -m pip install -q --disable-pip-version-check -e ".[dev]" -c constraints.txt
mkdir -p .cache && echo "$want" > "$stamp"
echo "[install] done"
