#!/usr/bin/env bash
# Creates a Cloud TPU VM (one worker, or one per host on a multi-host slice such as v4-32).
#
#   launch/create.sh [SETTINGS] [--spot | --preemptible]
#
# Then: launch/install.sh, launch/run.sh, launch/fetch.sh, launch/delete.sh (launch/README.md).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [SETTINGS] [--spot | --preemptible]

Creates the TPU VM: gcloud compute tpus tpu-vm create NAME --accelerator-type=TYPE
--version=RUNTIME --zone=ZONE [--project=PROJECT] [--spot | --preemptible].

  --spot           a Spot TPU (cheaper; can be reclaimed at any time)
  --preemptible    a preemptible TPU (older equivalent of --spot)

$COMMON_HELP
USAGE
}

CAPACITY=()
while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --spot | --preemptible) CAPACITY=("$1"); shift ;;
    *)
      common_flag "$@"
      [ "$SHIFT_BY" -gt 0 ] || die "unknown argument '$1' (see --help)"
      shift "$SHIFT_BY"
      ;;
  esac
done
check_settings
need_gcloud

tpu_vm create "$T2I_NAME" "--accelerator-type=$T2I_TYPE" "--version=$T2I_VERSION" \
  ${CAPACITY[@]+"${CAPACITY[@]}"}
