#!/usr/bin/env bash
# The headless browser the page tests drive (the pipeline report, the arena page): Debian's Chromium at
# /usr/bin/chromium, driven by Playwright's Python client (requirements/dev.txt) with executablePath set; Playwright
# never downloads a browser of its own.
#
#   infra/scripts/setup-browser.sh
#
# Idempotent: with /usr/bin/chromium present it prints its version and exits. As root it installs Debian's
# chromium package (~25 s); otherwise it says what to install and fails.
set -euo pipefail
BIN=${TUNERY_CHROMIUM:-/usr/bin/chromium}
if [ -x "$BIN" ]; then
  echo "browser: $("$BIN" --version 2>/dev/null || echo "$BIN")"
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null; then
  echo "error: $BIN is missing: install Chromium (Debian: apt-get install chromium) or set TUNERY_CHROMIUM" >&2
  exit 1
fi
start=$(date +%s)
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
echo "browser: $("$BIN" --version) installed in $(( $(date +%s) - start ))s"
