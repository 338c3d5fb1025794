#!/bin/sh
# tunery-worker-start: join a Ray cluster as a worker node of this image's role (compose, `docker run`).
#   RAY_HEAD              host of the Ray head (required), e.g. ray-head
#   RAY_HEAD_PORT         its GCS port (6379)
#   TUNERY_NODE_ROLE      train | quantize | serve (baked into the image by --build-arg ROLE)
#   TUNERY_ROLE_UNITS     how many units of tunery_<role> the node offers (1000: jobs ask for 1 each,
#                         so it acts as a label; CPU, GPU and memory are what really limit placement)
#   RAY_START_EXTRA_ARGS  appended as is, e.g. "--num-cpus=8 --num-gpus=1"
# KubeRay and the Ray cluster launcher do not use this script: they build their own `ray start`.
set -eu

role="${TUNERY_NODE_ROLE:?TUNERY_NODE_ROLE is unset (build the image with --build-arg ROLE=...)}"
case "$role" in
  train|quantize|serve) ;;
  *) echo "tunery-worker-start: unknown role '$role'" >&2; exit 2 ;;
esac
head="${RAY_HEAD:?set RAY_HEAD to the Ray head host, e.g. ray-head}"
port="${RAY_HEAD_PORT:-6379}"
units="${TUNERY_ROLE_UNITS:-1000}"

echo "tunery-worker-start: role=$role device=${TUNERY_NODE_DEVICE:-?} head=$head:$port"
# shellcheck disable=SC2086  # RAY_START_EXTRA_ARGS is a list of flags on purpose
exec ray start --address="$head:$port" --block \
  --resources="{\"tunery_$role\": $units}" \
  ${RAY_START_EXTRA_ARGS:-}
