#!/usr/bin/env bash
# Copies results from worker 0 of the TPU VM (the primary process, which writes the reports
# and checkpoints' metadata) to this machine.
#
#   launch/fetch.sh [SETTINGS] [--remote PATH] [--local DIR] [--worker N]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

REMOTE_PATH="t2i_mia_out"
LOCAL_DIR=""
WORKER="0"

usage() {
  cat <<USAGE
Usage: $PROG [SETTINGS] [--remote PATH] [--local DIR] [--worker N]

  --remote PATH   file or folder on the worker, relative to ~/$REMOTE_DIR unless absolute
                  (default t2i_mia_out, the entry points' default --out)
  --local DIR     where to put it here (default tpu_results/NAME; created)
  --worker N      the worker to copy from (default 0, the primary)

Runs: mkdir -p DIR, then gcloud compute tpus tpu-vm scp --recurse NAME:PATH DIR --worker=N.
Orbax checkpoints on several hosts are written by every worker into the folder given to
them: point --work-dir at a gs:// bucket to keep checkpoints in one place.

$COMMON_HELP
USAGE
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --remote | --remote=*)
      flag_value --remote "$@"; REMOTE_PATH="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --local | --local=*) flag_value --local "$@"; LOCAL_DIR="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --worker | --worker=*) flag_value --worker "$@"; WORKER="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    *)
      common_flag "$@"
      [ "$SHIFT_BY" -gt 0 ] || die "unknown argument '$1' (see --help)"
      shift "$SHIFT_BY"
      ;;
  esac
done
check_settings
[ -n "$REMOTE_PATH" ] || die "--remote: empty path"
[[ "$WORKER" =~ ^[0-9]+$ ]] || die "--worker '$WORKER': a worker number"
LOCAL_DIR="${LOCAL_DIR:-tpu_results/$T2I_NAME}"
case "$REMOTE_PATH" in
  /*) SOURCE="$T2I_NAME:$REMOTE_PATH" ;;
  *) SOURCE="$T2I_NAME:$REMOTE_DIR/$REMOTE_PATH" ;;
esac
need_gcloud

run mkdir -p "$LOCAL_DIR"
tpu_vm scp --recurse "$SOURCE" "$LOCAL_DIR" "--worker=$WORKER"
