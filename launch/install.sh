#!/usr/bin/env bash
# Installs this repository's committed code on every worker of the TPU VM.
#
#   launch/install.sh [SETTINGS] [--ref REF] [--extras LIST] [--jax-spec SPEC] [--python PY]
#
# Packs REF (default HEAD: uncommitted changes are not sent) with `git archive`, copies it
# to every worker, unpacks it into ~/t2i-mia and installs it with JAX for TPU into a
# virtualenv ~/.t2i-mia-venv (Python 3.11, installed from apt when the image lacks it).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REF="HEAD"
EXTRAS=""
# The JAX version this package is tested with; libtpu comes with the [tpu] extra.
JAX_SPEC="${T2I_MIA_JAX_SPEC:-jax[tpu]==0.10.2}"
PY="python3.11"

usage() {
  cat <<USAGE
Usage: $PROG [SETTINGS] [--ref REF] [--extras LIST] [--jax-spec SPEC] [--python PY]

  --ref REF         git commit, branch or tag to install (default HEAD; uncommitted
                    changes are not included)
  --extras LIST     package extras, comma-separated (e.g. test); default none
  --jax-spec SPEC   pip requirement for JAX on TPU (\$T2I_MIA_JAX_SPEC, default
                    'jax[tpu]==0.10.2', the version the package is tested with)
  --python PY       Python interpreter for the virtualenv on the workers (default
                    python3.11; installed with apt if missing)

Runs: git archive (local), gcloud compute tpus tpu-vm scp ... --worker=all, then
gcloud compute tpus tpu-vm ssh ... --worker=all --command=<unpack and pip install>.

$COMMON_HELP
USAGE
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --ref | --ref=*) flag_value --ref "$@"; REF="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --extras | --extras=*) flag_value --extras "$@"; EXTRAS="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --jax-spec | --jax-spec=*)
      flag_value --jax-spec "$@"; JAX_SPEC="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --python | --python=*) flag_value --python "$@"; PY="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    *)
      common_flag "$@"
      [ "$SHIFT_BY" -gt 0 ] || die "unknown argument '$1' (see --help)"
      shift "$SHIFT_BY"
      ;;
  esac
done
check_settings
[[ "$EXTRAS" =~ ^[A-Za-z0-9_,-]*$ ]] || die "--extras '$EXTRAS': comma-separated extra names"
[[ "$PY" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--python '$PY': an interpreter name or path"
need_gcloud

TARBALL="${TMPDIR:-/tmp}/t2i-mia-$T2I_NAME.tar.gz"
PKG="\"\$HOME/$REMOTE_DIR${EXTRAS:+[$EXTRAS]}\""
VPY="\"\$HOME/$REMOTE_VENV/bin/python\""
REMOTE="set -euo pipefail"
REMOTE+="; if ! command -v $PY >/dev/null 2>&1; then sudo apt-get update -qq"
REMOTE+=" && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $PY $PY-venv; fi"
REMOTE+="; $PY -m venv \"\$HOME/$REMOTE_VENV\""
REMOTE+="; $VPY -m pip install -q -U pip"
REMOTE+="; rm -rf \"\$HOME/$REMOTE_DIR\" && mkdir -p \"\$HOME/$REMOTE_DIR\""
REMOTE+="; tar -xzf \"\$HOME/$REMOTE_DIR.tar.gz\" -C \"\$HOME/$REMOTE_DIR\""
REMOTE+="; $VPY -m pip install -q $(quote "$JAX_SPEC") -e $PKG"
REMOTE+="; $VPY -c 'import jax, t2i_mia; print(\"t2i_mia\", t2i_mia.__file__, \"jax\", jax.__version__)'"

run git -C "$REPO" archive --format=tar.gz -o "$TARBALL" "$REF"
tpu_vm scp "$TARBALL" "$T2I_NAME:$REMOTE_DIR.tar.gz" --worker=all
tpu_vm ssh "$T2I_NAME" --worker=all "--command=$REMOTE"
