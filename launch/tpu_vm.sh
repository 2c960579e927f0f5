#!/usr/bin/env bash
# Run a nasjax search on every worker of a Cloud TPU VM (single- or multi-host).
#
#   launch/tpu_vm.sh --name=nas-v4 --zone=us-central2-b --accelerator=v4-32 \
#       --config=configs/search/primer.py:small --workdir=/mnt/runs/primer [--create] [-- --config.KEY=VALUE ...]
#
# What it does:
#   1. (--create) creates the TPU VM with `gcloud compute tpus tpu-vm create`, or checks that it exists;
#   2. copies this checkout to every worker (scp --worker=all);
#   3. installs jax[tpu] and nasjax on every worker;
#   4. runs `nasjax search` on all workers at once (--worker=all). JAX finds the other hosts itself
#      (nasjax.distributed: TPU_WORKER_HOSTNAMES), process 0 proposes and writes the journal;
#   5. streams worker 0's log (the controller's) to this terminal and to launch-<name>.log.
# The same command resumes the search (the journal in --workdir, which should be on a persistent
# disk or a bucket mount shared by the workers; only worker 0 writes it).
set -euo pipefail

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

NAME="" ZONE="" ACCEL="" VERSION="tpu-ubuntu2204-base" CONFIG="" WORKDIR="" CREATE=0 PROJECT="" EXTRA=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name=*) NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --accelerator=*) ACCEL="${1#*=}" ;;
    --version=*) VERSION="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --create) CREATE=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown argument $1" >&2; usage 2 ;;
  esac
  shift
done

missing=()
[[ -n "$NAME" ]] || missing+=("--name=TPU_NAME")
[[ -n "$ZONE" ]] || missing+=("--zone=ZONE")
[[ -n "$CONFIG" ]] || missing+=("--config=FILE[:preset]")
[[ -n "$WORKDIR" ]] || missing+=("--workdir=DIR (on the workers)")
[[ $CREATE -eq 0 || -n "$ACCEL" ]] || missing+=("--accelerator=TYPE (needed with --create)")
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "error: missing ${missing[*]}" >&2
  usage 2
fi
command -v gcloud >/dev/null || { echo "error: gcloud is not installed (https://cloud.google.com/sdk)" >&2; exit 2; }
[[ -f "${CONFIG%%:*}" ]] || { echo "error: config file ${CONFIG%%:*} not found (run from the nasjax checkout)" >&2; exit 2; }

GC=(gcloud compute tpus tpu-vm)
[[ -n "$PROJECT" ]] && GC+=(--project="$PROJECT")
if ! "${GC[@]}" describe "$NAME" --zone="$ZONE" >/dev/null 2>&1; then
  if [[ $CREATE -eq 1 ]]; then
    echo "creating TPU VM $NAME ($ACCEL, $VERSION) in $ZONE"
    "${GC[@]}" create "$NAME" --zone="$ZONE" --accelerator-type="$ACCEL" --version="$VERSION"
  else
    echo "error: TPU VM $NAME does not exist in $ZONE (add --create --accelerator=TYPE)" >&2; exit 2
  fi
fi

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="$(mktemp -d)/nasjax.tar.gz"
git -C "$ROOT" archive --format=tar.gz -o "$TARBALL" HEAD
echo "copying the checkout (HEAD) to every worker"
"${GC[@]}" scp "$TARBALL" "$NAME":~/nasjax.tar.gz --zone="$ZONE" --worker=all
SETUP='set -e; mkdir -p ~/nasjax && tar -xzf ~/nasjax.tar.gz -C ~/nasjax && cd ~/nasjax &&
  python3 -m pip install -q -U pip && python3 -m pip install -q "jax[tpu]" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html &&
  python3 -m pip install -q -e .'
echo "installing jax[tpu] and nasjax on every worker"
"${GC[@]}" ssh "$NAME" --zone="$ZONE" --worker=all --command="$SETUP"

ARGS=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
RUN="cd ~/nasjax && mkdir -p $(printf %q "$WORKDIR") && python3 -m nasjax.cli search$ARGS > ~/nasjax-search.log 2>&1; echo exit \$? >> ~/nasjax-search.log"
echo "starting the search on all workers (log: ~/nasjax-search.log on each)"
"${GC[@]}" ssh "$NAME" --zone="$ZONE" --worker=all --command="nohup bash -c $(printf %q "$RUN") >/dev/null 2>&1 &"
echo "streaming worker 0 (the controller); Ctrl-C stops streaming, not the search"
"${GC[@]}" ssh "$NAME" --zone="$ZONE" --worker=0 --command="tail -n +1 -F ~/nasjax-search.log" | tee "launch-$NAME.log"
