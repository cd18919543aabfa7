#!/usr/bin/env bash
# Paper-scale benchmark stages for one lent accelerator (H100 / H200), in about 8 minutes.
#
#   bench/gpu.sh [STAGE ...]        (default: all five, in this order)
#
# Stages:
#   ldm_train_paper  paper-ldm (SD-1.x-sized) U-Net + text encoder train step, bf16, MFU
#   ddim_256         DDIM images/s at 256x256 (50 steps, guidance 7.5), one jit vs step loop
#   dalle_decode     DalleBart at dalle-mini size: tokens/s, KV cache vs full prefix (256)
#   attack           the attack stage: feature extraction queries/s + MLPAttack vs sklearn
#   peers            bench/peers.py, bf16: ours vs diffusers' Flax pipeline / U-Net step and
#                    dalle-mini's generate, in the peer venv (PEER_PYTHON, default
#                    /tmp/t2i-mia-peers/bin/python; built with the machine's JAX by
#                    bench/peer-venv.sh, offline from wheels/ when present)
#
# Uses the JAX already installed on the machine; installs this package with
# `pip install --no-deps -e .` and, when a wheels/ folder is present, any missing
# dependency from it offline (see bench/README.md, "Running on a lent GPU").
# Each stage prints its table as soon as it finishes and writes $OUT/bench_<stage>.json
# (OUT defaults to ./bench_out). Stage time limits (seconds) can be changed with
# T_LDM, T_DDIM, T_DALLE, T_ATTACK, T_PEERS; the defaults add up to 450.
set -uo pipefail

cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-bench_out}"
mkdir -p "$OUT_DIR"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-/tmp/t2i_mia_jax_cache}"
PY="${PYTHON:-python}"

T_LDM="${T_LDM:-110}"
T_DDIM="${T_DDIM:-90}"
T_DALLE="${T_DALLE:-60}"
T_ATTACK="${T_ATTACK:-40}"
T_PEERS="${T_PEERS:-150}"

log() { printf '[gpu.sh %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

setup() {
  if ! "$PY" -c 'import jax' 2>/dev/null; then
    log "no JAX in $PY: this script uses the machine's own JAX"; exit 1
  fi
  "$PY" -m pip install --quiet --no-deps -e . || { log "pip install -e . failed"; exit 1; }
  local missing
  missing=$("$PY" - <<'EOF'
import importlib.util
mods = {"flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "msgpack": "msgpack", "tokenizers": "tokenizers", "PIL": "pillow", "tqdm": "tqdm",
        "matplotlib": "matplotlib", "sklearn": "scikit-learn", "ml_dtypes": "ml_dtypes"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m.split(".")[0]) is None
               or (m == "orbax.checkpoint" and importlib.util.find_spec(m) is None)))
EOF
)
  if [ -n "$missing" ]; then
    if [ -d wheels ]; then
      log "installing from wheels/: $missing"
      # shellcheck disable=SC2086  # one word per package
      "$PY" -m pip install --quiet --no-index --find-links wheels $missing \
        || { log "offline install failed"; exit 1; }
    else
      log "missing packages: $missing (carry a wheels/ folder, see bench/README.md)"; exit 1
    fi
  fi
  "$PY" -c 'import jax; d = jax.devices(); print("jax", jax.__version__, jax.default_backend(), len(d), "x", d[0].device_kind)'
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null || true
}

# stage NAME LIMIT_S run.py-args...
stage() {
  local name=$1 limit=$2
  shift 2
  local json="$OUT_DIR/bench_${name}.json" script="${BENCH_SCRIPT:-bench/run.py}" t0 rc
  t0=$(date +%s)
  log "stage $name (limit ${limit}s): $script $*"
  timeout --signal=TERM --kill-after=10 "$limit" "$PY" "$script" "$@" --json "$json"
  rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    log "stage $name: TIMED OUT after ${limit}s (raise T_* or run the stage alone)"
  else
    log "stage $name: exit $rc after $(( $(date +%s) - t0 ))s -> $json"
  fi
  return 0
}

# The peers run in their own venv (never in this package's environment).
peers_stage() {
  local py="${PEER_PYTHON:-/tmp/t2i-mia-peers/bin/python}"
  if [ ! -x "$py" ]; then
    log "stage peers: building the peer venv with the machine's JAX (bench/peer-venv.sh)"
    if [ -d wheels ]; then
      export PIP_NO_INDEX=1 PIP_FIND_LINKS="$PWD/wheels"
    fi
    if ! PEER_VENV_SYSTEM_JAX=1 bash bench/peer-venv.sh "$(dirname "$(dirname "$py")")"; then
      log "stage peers: SKIPPED (no peer venv: needs PyPI, or wheels/ holding the peers)"
      return 0
    fi
  fi
  PY="$py" BENCH_SCRIPT=bench/peers.py stage peers "$T_PEERS" --dtype bfloat16 \
    --repeats 3 --budget-s 15
}

run_stage() {
  case "$1" in
    ldm_train_paper)
      stage ldm_train_paper "$T_LDM" --scale paper --dtype bfloat16 --only ldm_train \
        --repeats 5 --budget-s 15 ;;
    ddim_256)
      stage ddim_256 "$T_DDIM" --scale paper --dtype bfloat16 --only ddim \
        --repeats 3 --budget-s 15 ;;
    dalle_decode)
      stage dalle_decode "$T_DALLE" --scale paper --dtype bfloat16 --only dallebart_decode \
        --repeats 3 --budget-s 15 ;;
    attack)
      stage attack "$T_ATTACK" --scale paper --only features,mlp_vs_sklearn \
        --repeats 2 --budget-s 10 ;;
    peers)
      peers_stage ;;
    *)
      log "unknown stage '$1' (ldm_train_paper, ddim_256, dalle_decode, attack, peers)"; return 1 ;;
  esac
}

main() {
  local stages=("$@")
  if [ ${#stages[@]} -eq 0 ]; then
    stages=(ldm_train_paper ddim_256 dalle_decode attack peers)
  fi
  for s in "${stages[@]}"; do
    case "$s" in
      ldm_train_paper|ddim_256|dalle_decode|attack|peers) ;;
      *) log "unknown stage '$s' (ldm_train_paper, ddim_256, dalle_decode, attack, peers)"; exit 2 ;;
    esac
  done
  setup
  local t0
  t0=$(date +%s)
  for s in "${stages[@]}"; do
    run_stage "$s"
  done
  log "done in $(( $(date +%s) - t0 ))s; results in $OUT_DIR/"
}

main "$@"
