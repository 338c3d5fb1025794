#!/usr/bin/env bash
# llama.cpp for the GGUF schemes (services/core/llama_cpp.py), with nothing to compile: two npm tarballs
# pinned with their integrity in infra/llama-cpp/packages.txt, unpacked into build/llama-cpp/pkg/<name>:
#   node-llama-cpp             its llama/gitRelease.bundle checked out as build/llama-cpp/src
#                              (convert_hf_to_gguf.py, conversion/, gguf-py/)
#   @node-llama-cpp/linux-x64  bins/linux-x64: the prebuilt CPU libllama and ggml backends of that release
#
#   infra/scripts/setup-llama-cpp.sh
#
# Idempotent: build/llama-cpp/.tunery-stamp records the sha256 of packages.txt and this script.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

OUT=build/llama-cpp
STAMP=$OUT/.tunery-stamp
want=$(sha256sum infra/llama-cpp/packages.txt infra/scripts/setup-llama-cpp.sh)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$OUT/src/convert_hf_to_gguf.py" ]; then
  echo "llama-cpp up to date"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm not found (install Node.js with npm)" >&2; exit 1; }
command -v git >/dev/null || { echo "error: git not found" >&2; exit 1; }

start=$(date +%s)
rm -rf "$OUT" && mkdir -p "$OUT/tarballs"
export npm_config_update_notifier=false
grep -v '^#' infra/llama-cpp/packages.txt | while read -r spec integrity; do
  [ -n "$spec" ] || continue
  got=$(cd "$OUT/tarballs" && npm pack --json --loglevel=error "$spec" | python3 -c \
    'import json,sys; d=json.load(sys.stdin)[0]; print(d["integrity"], d["filename"])')
  read -r sri file <<<"$got"
  # npm pack checks the registry's integrity; this checks the registry's answer is the pinned one
  [ "$sri" = "$integrity" ] || { echo "error: $spec has integrity $sri, pinned $integrity" >&2; exit 1; }
  name=${spec%@*}
  mkdir -p "$OUT/pkg/$name"
  tar -xzf "$OUT/tarballs/$file" -C "$OUT/pkg/$name" --strip-components=1
done
rm -rf "$OUT/tarballs"
git -c advice.detachedHead=false clone -q "$OUT/pkg/node-llama-cpp/llama/gitRelease.bundle" "$OUT/src"
ls "$OUT"/pkg/@node-llama-cpp/linux-x64/bins/linux-x64/libllama*.so >/dev/null
echo "$want" > "$STAMP"
echo "==> llama-cpp ready in $(( $(date +%s) - start ))s: $OUT (llama.cpp $(git -C "$OUT/src" log -1 --format=%h))"
