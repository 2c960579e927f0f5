#!/usr/bin/env bash
# On a Ray cluster's head node: a nasjax search whose evaluations run on the cluster's GPUs.
#   launch/ray_search.sh --config=FILE[:preset] --workdir=DIR [--in_flight=N] [-- --config.KEY=VALUE ...]
# One actor per GPU (ray_gpus_per_actor=1); N evaluations in flight (default: the cluster's GPU count).
set -euo pipefail
CONFIG="" WORKDIR="" IN_FLIGHT="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --in_flight=*) IN_FLIGHT="${1#*=}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
[[ -n "$CONFIG" && -n "$WORKDIR" ]] || { echo "error: needs --config=FILE[:preset] and --workdir=DIR" >&2; exit 2; }
cd "$(dirname "$0")/.."
if [[ -z "$IN_FLIGHT" ]]; then
  IN_FLIGHT=$(python3 -c "import ray; ray.init(address='auto', log_to_driver=False); print(int(ray.cluster_resources().get('GPU', 0)) or 1)")
fi
exec python3 -m nasjax.cli search --config="$CONFIG" --workdir="$WORKDIR" --config.engine=ray \
  --config.ray_address=auto --config.search.in_flight="$IN_FLIGHT" --config.ray_gpus_per_actor=1 "${EXTRA[@]}"
