#!/usr/bin/env bash
# Run a nasjax search on a local GPU box, several evaluations sharing each GPU.
#
#   launch/gpu_local.sh --config=configs/search/primer.py:small --workdir=runs/primer \
#       [--per_gpu=2] [--gpus=0,1] [--install] [-- --config.KEY=VALUE ...]
#
# Starts a local Ray (engine=ray) with one actor per (GPU, slot): --per_gpu actors share a GPU,
# each with XLA_PYTHON_CLIENT_MEM_FRACTION = 0.9 / per_gpu so they fit together, and
# search.in_flight = actors. --install first runs pip install -e ".[ray]" "jax[cuda12]".
# The same command resumes the search from --workdir.
set -euo pipefail

usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

CONFIG="" WORKDIR="" PER_GPU=1 GPUS="" INSTALL=0 EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --per_gpu=*) PER_GPU="${1#*=}" ;;
    --gpus=*) GPUS="${1#*=}" ;;
    --install) INSTALL=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
  shift
done
missing=()
[[ -n "$CONFIG" ]] || missing+=("--config=FILE[:preset]")
[[ -n "$WORKDIR" ]] || missing+=("--workdir=DIR")
if [[ ${#missing[@]} -gt 0 ]]; then echo "error: missing ${missing[*]}" >&2; usage 2; fi
[[ "$PER_GPU" =~ ^[1-9][0-9]*$ ]] || { echo "error: --per_gpu must be a positive integer, got $PER_GPU" >&2; exit 2; }
[[ -f "${CONFIG%%:*}" ]] || { echo "error: config file ${CONFIG%%:*} not found" >&2; exit 2; }
command -v nvidia-smi >/dev/null || { echo "error: nvidia-smi not found: no NVIDIA driver on this machine" >&2; exit 2; }

if [[ $INSTALL -eq 1 ]]; then
  python3 -m pip install -e ".[ray]" "jax[cuda12]"
fi
python3 -c "import ray" 2>/dev/null || { echo "error: Ray is not installed (rerun with --install)" >&2; exit 2; }
if [[ -z "$GPUS" ]]; then
  GPUS=$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd, -)
fi
N_GPUS=$(tr ',' '\n' <<<"$GPUS" | grep -c .)
[[ $N_GPUS -gt 0 ]] || { echo "error: no GPU visible (nvidia-smi lists none)" >&2; exit 2; }
ACTORS=$((N_GPUS * PER_GPU))
FRACTION=$(python3 -c "print(round(0.9 / $PER_GPU, 3))")
echo "$N_GPUS GPU(s) [$GPUS] x $PER_GPU = $ACTORS actors, memory fraction $FRACTION each"

export CUDA_VISIBLE_DEVICES="$GPUS"
export XLA_PYTHON_CLIENT_MEM_FRACTION="$FRACTION"   # inherited by the Ray actors
export XLA_PYTHON_CLIENT_PREALLOCATE=false
GPU_SHARE=$(python3 -c "print(round(1.0 / $PER_GPU, 4))")
exec python3 -m nasjax.cli search --config="$CONFIG" --workdir="$WORKDIR" \
  --config.engine=ray --config.ray_actors="$ACTORS" --config.search.in_flight="$ACTORS" \
  --config.ray_gpus_per_actor="$GPU_SHARE" "${EXTRA[@]}"
