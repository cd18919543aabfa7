#!/usr/bin/env bash
# Deletes the TPU VM (every worker of the slice; their disks and unfetched results go too).
#
#   launch/delete.sh [SETTINGS]
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<USAGE
Usage: $PROG [SETTINGS]

Deletes the TPU VM without asking: gcloud compute tpus tpu-vm delete NAME --quiet
--zone=ZONE [--project=PROJECT]. Fetch the results first (launch/fetch.sh).

$COMMON_HELP
USAGE
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    *)
      common_flag "$@"
      [ "$SHIFT_BY" -gt 0 ] || die "unknown argument '$1' (see --help)"
      shift "$SHIFT_BY"
      ;;
  esac
done
check_settings
need_gcloud

tpu_vm delete "$T2I_NAME" --quiet
