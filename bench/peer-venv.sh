#!/usr/bin/env bash
# Builds the environment of bench/peers.py in a throwaway venv: our code beside the peers,
# diffusers 0.39 (the last release with Flax) and dalle-mini 0.1.5. The peers are never
# dependencies of t2i-mia or of its tests.
#
#     bash bench/peer-venv.sh [VENV]          # default: /tmp/t2i-mia-peers
#     VENV/bin/python bench/peers.py --quick
#
# PEER_VENV_SYSTEM_JAX=1 makes the venv see the machine's own jax/flax/optax (an
# accelerator's JAX, as bench/gpu.sh uses) instead of installing CPU ones; pip's own
# PIP_NO_INDEX / PIP_FIND_LINKS make it install offline from a wheels/ folder.
#
# dalle-mini 0.1.5 pins jax 0.3.25 and flax 0.6.3; it is installed with --no-deps on the
# jax/flax t2i-mia uses, beside the transformers (4.25.1) and tokenizers (0.13.3) it was
# written for. peers.py gives it the few aliases it expects from old jax (see its
# ``_dalle_mini_compat``). t2i-mia itself is installed with --no-deps too, because its
# tokenizers requirement (>= 0.19) conflicts with transformers 4.25.1's (< 0.14); the
# benchmarks do not tokenize text.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-/tmp/t2i-mia-peers}"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ "${PEER_VENV_SYSTEM_JAX:-0}" = 1 ]; then
  python3 -m venv --system-site-packages "$VENV"
  BASE=()
else
  python3 -m venv "$VENV"
  JAX_VERSION="$(python3 -c 'import jax; print(jax.__version__)' 2>/dev/null || echo 0.10.2)"
  FLAX_VERSION="$(python3 -c 'import flax; print(flax.__version__)' 2>/dev/null || echo 0.12.8)"
  BASE=("jax==$JAX_VERSION" "flax==$FLAX_VERSION" optax orbax-checkpoint numpy msgpack pillow
        tqdm matplotlib)
fi
"${PIP[@]}" "${BASE[@]}" "safetensors>=0.8" \
  "diffusers==0.39.0" "transformers==4.25.1" "tokenizers==0.13.3" "huggingface-hub>=0.34,<1.0" \
  einops emoji ftfy unidecode
"${PIP[@]}" --no-deps "dalle-mini==0.1.5"
"${PIP[@]}" --no-deps -e .
"$VENV/bin/python" bench/peers.py --check
echo "peer venv ready: $VENV/bin/python bench/peers.py --quick"
