#!/usr/bin/env bash
# Install Python packages into a virtual environment with uv, the way pip would: pip's own configuration (index,
# extra indexes, find-links, constraints: pip.conf or PIP_* variables) is translated to uv's flags, and every module
# is byte-compiled at install time (as pip does; a machine with PYTHONDONTWRITEBYTECODE=1 never writes .pyc later).
#
#   infra/scripts/pyinstall.sh VENV [pip install arguments...]
#   e.g. infra/scripts/pyinstall.sh .venvs/serve -r requirements/serve.txt
#
# uv (pinned below) is installed into VENV by pip on first use. It resolves like pip (the same versions: its
# best-match strategy across every index, as pip merges them) but installs ~4x faster: the serve venv took 89 s
# (140 s CPU) against pip's ~390 s on the 2-core CI machine. TUNERY_INSTALLER=pip uses pip itself.
set -euo pipefail

[ $# -ge 2 ] || { echo "usage: $0 VENV ARGS..." >&2; exit 2; }
VENV=$1
shift
VPY=$VENV/bin/python
UV_VERSION=0.13.10

if [ "${TUNERY_INSTALLER:-uv}" = "pip" ]; then
  exec "$VPY" -m pip install -q "$@"
fi

if [ "$("$VENV/bin/uv" --version 2>/dev/null)" != "uv $UV_VERSION" ]; then
  "$VPY" -m pip install -q "uv==$UV_VERSION"
fi

# pip's setting NAME: its environment variable wins, then pip.conf's [install] and [global] sections
pip_setting() {
  local env_name="PIP_$(echo "$1" | tr 'a-z-' 'A-Z_')"
  if [ -n "${!env_name:-}" ]; then
    echo "${!env_name}"
    return
  fi
  "$VPY" -m pip config get "install.$1" 2>/dev/null || "$VPY" -m pip config get "global.$1" 2>/dev/null || true
}

flags=()
index=$(pip_setting index-url)
[ -n "$index" ] && flags+=(--index-url "$index")
for url in $(pip_setting extra-index-url); do flags+=(--extra-index-url "$url"); done
for dir in $(pip_setting find-links); do flags+=(--find-links "$dir"); done
for file in $(pip_setting constraint); do flags+=(--constraint "$file"); done

exec "$VENV/bin/uv" pip install --quiet --python "$VPY" --compile-bytecode --index-strategy unsafe-best-match \
  "${flags[@]}" "$@"
