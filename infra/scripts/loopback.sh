#!/usr/bin/env bash
# Run a command inside a loopback-only network namespace when this process may make one.
# Ray's head binds every interface and picks a non-loopback node address; inside the namespace only
# 127.0.0.1 exists, so nothing the tests or the demo start is reachable from outside.
# TUNERY_NETNS=0 runs the command as it is (a workstation where that is wanted).
set -euo pipefail
if [ "${TUNERY_NETNS:-auto}" != "0" ] && [ "$(id -u)" = "0" ] && command -v unshare >/dev/null && ! command -v ip >/dev/null; then
  echo "loopback.sh: 'ip' (iproute2) is missing, so the namespace's loopback cannot be brought up; install iproute2" >&2
  exit 1
fi
if [ "${TUNERY_NETNS:-auto}" != "0" ] && [ "$(id -u)" = "0" ] && command -v unshare >/dev/null \
   && [ -z "${TUNERY_IN_NETNS:-}" ] && unshare -n true 2>/dev/null; then
  exec unshare -n env TUNERY_IN_NETNS=1 bash -c 'ip link set lo up && exec "$@"' loopback "$@"
fi
exec "$@"
