#!/usr/bin/env bash
# Issue 8's GPU checks as one prepared command, for a session lent a device machine
# (one NVIDIA H100/H200, Python 3.12 and JAX 0.11 with CUDA, PyTorch, no network).
#
# Here, once per checkout (downloads the wheels that machine's image lacks into .whl/,
# which only this checkout's .git/info/exclude ignores; ~5 MB):
#
#   bash benchmarks/device_checks.sh --fetch
#
# Then one call of the device tool, carrying .whl, with timeout_s=600 (the default steps'
# limits add up to 560 s, within one command's 600; a device session has 15 minutes in
# all, starts included):
#
#   bash benchmarks/device_checks.sh env throughput vs_torch search
#
# and, if time is left, a second call: bash benchmarks/device_checks.sh tests
#
# Steps (each under its own time limit; its log goes to $OUT/STEP.log, or to the folder
# given as DEVICE_CHECKS_OUT, and its tail to stdout; the search's journal is copied there
# too). The script's exit status is the worst step's.
#   env         versions, the devices JAX and PyTorch see, nasjax imports      (40 s)
#   throughput  train_throughput.py, bfloat16, tiny/small/base: tokens/s, MFU  (200 s)
#   vs_torch    vs_torch.py on the GPU, bfloat16, small and base              (200 s)
#   search      the default tiny Primer search, 30 evaluations, on the GPU     (120 s)
#   tests       the whole suite on that machine's CPU (JAX 0.11), 8 workers    (540 s)
# With no step named: env throughput vs_torch search.
set -uo pipefail
cd "$(dirname "$0")/.."

PY312_PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
# What the core needs beyond the image's packages (KINDS.md of the device tool lists them).
WHEELS=(ml-collections grain array-record portpicker tensorboardX)

if [[ "${1:-}" == "--fetch" ]]; then
  mkdir -p .whl
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PY312_PLATFORMS[@]}" -d .whl "${WHEELS[@]}" || { echo "error: could not download ${WHEELS[*]}" >&2; exit 1; }
  ls -l .whl
  exit 0
fi

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(env throughput vs_torch search)
for s in "${steps[@]}"; do
  case "$s" in env | throughput | vs_torch | search | tests) ;; *) echo "error: unknown step '$s' (env, throughput, vs_torch, search, tests)" >&2; exit 2 ;; esac
done
OUTDIR="${DEVICE_CHECKS_OUT:-${OUT:-/tmp/nasjax_device_checks}}"
mkdir -p "$OUTDIR"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/nasjax_site .whl/*.whl ||
    { echo "error: installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH="/tmp/nasjax_site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "warning: no .whl/ here (run 'bash benchmarks/device_checks.sh --fetch' before the call, and carry .whl)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

WORST=0
step() {  # step NAME LIMIT_S COMMAND...
  local name=$1 limit=$2 start rc
  shift 2
  echo "=== $name (limit ${limit} s): $*"
  start=$(date +%s)
  timeout "$limit" "$@" >"$OUTDIR/$name.log" 2>&1
  rc=$?
  tail -n 40 "$OUTDIR/$name.log"
  echo "=== $name: rc $rc in $(($(date +%s) - start)) s"
  [[ $rc -le $WORST ]] || WORST=$rc
}

run_step() {
  case "$1" in
    env)
      step env 40 bash -c 'nvidia-smi -L; python3 -c "
import sys, jax, flax, optax
print(sys.version.split()[0], \"jax\", jax.__version__, \"flax\", flax.__version__, \"optax\", optax.__version__)
print(\"jax devices:\", jax.devices())
try:
    import torch
    print(\"torch\", torch.__version__, \"cuda:\", torch.cuda.is_available())
except ImportError:
    print(\"torch: not installed\")
import nasjax.cli, nasjax.search.run, nasjax.train.loop
print(\"nasjax imports\")
"' ;;
    throughput)
      step throughput 200 python3 benchmarks/train_throughput.py --dtype=bfloat16 --sizes=tiny,small,base --steps=20 ;;
    vs_torch)  # JAX allocates on demand, so PyTorch finds GPU memory too
      step vs_torch 200 env XLA_PYTHON_CLIENT_PREALLOCATE=false python3 benchmarks/vs_torch.py --device=cuda \
        --dtype=bfloat16 --sizes=small,base --rounds=5 ;;
    search)
      rm -rf /tmp/nasjax_gpu_search
      step search 120 python3 -m nasjax.cli search --config=configs/search/primer.py:tiny \
        --workdir=/tmp/nasjax_gpu_search --config.search.max_evaluations=30
      cp /tmp/nasjax_gpu_search/journal.jsonl "$OUTDIR/search_journal.jsonl" 2>/dev/null ;;
    tests)
      step tests 540 env JAX_PLATFORMS=cpu python3 -m pytest -n 8 -q -p no:cacheprovider tests ;;
  esac  # names are checked before any step runs
}

for s in "${steps[@]}"; do run_step "$s"; done
exit "$WORST"
