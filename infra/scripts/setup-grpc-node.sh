#!/usr/bin/env bash
# Install the outside Node.js gRPC client the wire-name tests use: infra/grpc-node/node_modules, exactly
# infra/grpc-node/package-lock.json (`npm ci`): @grpc/grpc-js 1.14.7 and @grpc/proto-loader 0.8.1 (pure
# JavaScript, no install scripts). The client runs on promptfoo's pinned Node 22 (infra/promptfoo).
#
#   infra/scripts/setup-grpc-node.sh
#
# Idempotent: node_modules/.tunery-stamp records the sha256 of package.json, package-lock.json and this script;
# when they are unchanged it prints "grpc-node up to date" and exits without touching the network.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"

DIR=infra/grpc-node
NM=$DIR/node_modules
STAMP=$NM/.tunery-stamp
want=$(sha256sum "$DIR/package.json" "$DIR/package-lock.json" infra/scripts/setup-grpc-node.sh)

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -f "$NM/@grpc/grpc-js/package.json" ] \
   && [ -f "$NM/@grpc/proto-loader/package.json" ]; then
  echo "grpc-node up to date"
  exit 0
fi
command -v npm >/dev/null || { echo "error: npm not found (install Node.js with npm; any version npm ci runs on)" >&2; exit 1; }

start=$(date +%s)
rm -f "$STAMP"
export npm_config_update_notifier=false
npm ci --prefix "$DIR" --no-audit --no-fund --ignore-scripts --loglevel=error
echo "$want" > "$STAMP"
echo "==> grpc-node ready in $(( $(date +%s) - start ))s: $NM"
