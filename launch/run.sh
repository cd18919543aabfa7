#!/usr/bin/env bash
# Runs one command on every worker of the TPU VM at once (the same program on each host, as
# JAX multi-host needs), in ~/t2i-mia with the virtualenv of launch/install.sh active.
#
#   launch/run.sh [SETTINGS] [--worker all|N] [--env KEY=VALUE]... -- COMMAND [ARGS...]
#   launch/run.sh [SETTINGS] [--worker all|N] [--env KEY=VALUE]... --command 'SHELL LINE'
#
# On a multi-host slice the package's entry points set up jax.distributed by themselves
# (t2i_mia.parallel.distributed: TPU detected); the primary worker (0) writes the results.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

WORKER="all"
ENVS=()
COMMAND=""

usage() {
  cat <<USAGE
Usage: $PROG [SETTINGS] [--worker all|N] [--env KEY=VALUE]... -- COMMAND [ARGS...]
       $PROG [SETTINGS] [--worker all|N] [--env KEY=VALUE]... --command 'SHELL LINE'

Runs COMMAND in ~/$REMOTE_DIR with ~/$REMOTE_VENV active on the workers:
gcloud compute tpus tpu-vm ssh NAME --worker=all --command='cd ... && COMMAND'.
Words after -- are quoted for the remote shell one by one; --command passes a shell line
as it is (for pipes, &&, redirections).

  --worker all|N    every worker at once (default all: what a multi-host JAX program
                    needs), or only worker N
  --env KEY=VALUE   exported before COMMAND (repeatable), e.g.
                    --env JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache

Example:
  $PROG --accelerator-type v4-32 -- python -m t2i_mia.attack --target ldm \\
      --config tpu_configs/ldm_v4-32.json --data coco --data-dir gs://BUCKET/coco

$COMMON_HELP
USAGE
}

while [ "$#" -gt 0 ]; do
  case "$1" in
    -h | --help) usage; exit 0 ;;
    --worker | --worker=*) flag_value --worker "$@"; WORKER="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --env | --env=*) flag_value --env "$@"; ENVS+=("$FLAG_VALUE"); shift "$SHIFT_BY" ;;
    --command | --command=*)
      flag_value --command "$@"; COMMAND="$FLAG_VALUE"; shift "$SHIFT_BY" ;;
    --)
      shift
      [ "$#" -gt 0 ] || die "nothing after -- (the command to run)"
      [ -z "$COMMAND" ] || die "give the command either after -- or with --command, not both"
      COMMAND="$(quote_all "$@")"
      break
      ;;
    *)
      common_flag "$@"
      [ "$SHIFT_BY" -gt 0 ] || die "unknown argument '$1' (see --help; the command goes after --)"
      shift "$SHIFT_BY"
      ;;
  esac
done
check_settings
[ -n "$COMMAND" ] || die "no command (give it after -- or with --command; see --help)"
[[ "$WORKER" =~ ^(all|[0-9]+)$ ]] || die "--worker '$WORKER': 'all' or a worker number"
need_gcloud

REMOTE="cd \"\$HOME/$REMOTE_DIR\" && source \"\$HOME/$REMOTE_VENV/bin/activate\""
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ "$kv" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv': expected KEY=VALUE"
  REMOTE+=" && export ${kv%%=*}=$(quote "${kv#*=}")"
done
REMOTE+=" && $COMMAND"

tpu_vm ssh "$T2I_NAME" "--worker=$WORKER" "--command=$REMOTE"
