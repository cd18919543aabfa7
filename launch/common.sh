# shellcheck shell=bash disable=SC2034  # the variables are read by the scripts that source it
# Shared by launch/*.sh (sourced, not run): TPU settings, flag parsing, quoting, --dry-run.
#
# Settings (flag > environment variable > default):
#   --name NAME              T2I_MIA_TPU_NAME      t2i-mia
#   --zone ZONE              T2I_MIA_TPU_ZONE      us-central2-b
#   --project PROJECT        T2I_MIA_TPU_PROJECT   (unset: gcloud's configured project)
#   --accelerator-type TYPE  T2I_MIA_TPU_TYPE      v4-8
#   --version RUNTIME        T2I_MIA_TPU_VERSION   (unset: chosen from TYPE, see tpu_runtime)
#   --dry-run                print the commands (one per line, shell-quoted), run nothing

T2I_NAME="${T2I_MIA_TPU_NAME:-t2i-mia}"
T2I_ZONE="${T2I_MIA_TPU_ZONE:-us-central2-b}"
T2I_PROJECT="${T2I_MIA_TPU_PROJECT:-}"
T2I_TYPE="${T2I_MIA_TPU_TYPE:-v4-8}"
T2I_VERSION="${T2I_MIA_TPU_VERSION:-}"
DRY_RUN=0
# On every worker, relative to the home folder: the unpacked package and its virtualenv.
REMOTE_DIR="t2i-mia"
REMOTE_VENV=".t2i-mia-venv"
PROG="$(basename "$0")"
SHIFT_BY=0

COMMON_HELP="Settings (flag, else environment variable, else default):
  --name NAME              TPU VM name            \$T2I_MIA_TPU_NAME     (t2i-mia)
  --zone ZONE              zone                   \$T2I_MIA_TPU_ZONE     (us-central2-b)
  --project PROJECT        project                \$T2I_MIA_TPU_PROJECT  (gcloud's default)
  --accelerator-type TYPE  e.g. v4-8, v5litepod-8, v4-32
                                                  \$T2I_MIA_TPU_TYPE     (v4-8)
  --version RUNTIME        TPU software version   \$T2I_MIA_TPU_VERSION  (from the type)
  --dry-run                print the commands it would run (one per line), run nothing
  -h, --help               this help"

die() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  exit 2
}

# common_flag ARGS...: parses one common flag at the front of ARGS; sets SHIFT_BY to the
# number of words it used (0: not a common flag). `--flag=value` is accepted too.
common_flag() {
  SHIFT_BY=0
  local flag="$1" value="" has_value=0
  if [[ "$flag" == --*=* ]]; then
    value="${flag#*=}"
    flag="${flag%%=*}"
    has_value=1
  elif [ "$#" -ge 2 ]; then
    value="$2"
  fi
  case "$flag" in
    --name | --zone | --project | --accelerator-type | --version)
      if [ "$has_value" = 0 ] && [ "$#" -lt 2 ]; then
        die "$flag needs a value"
      fi
      case "$flag" in
        --name) T2I_NAME="$value" ;;
        --zone) T2I_ZONE="$value" ;;
        --project) T2I_PROJECT="$value" ;;
        --accelerator-type) T2I_TYPE="$value" ;;
        --version) T2I_VERSION="$value" ;;
      esac
      SHIFT_BY=$((2 - has_value))
      ;;
    --dry-run)
      DRY_RUN=1
      SHIFT_BY=1
      ;;
  esac
}

# flag_value FLAG ARGS...: the value of a script-specific `--flag VALUE` / `--flag=VALUE`
# at the front of ARGS, in FLAG_VALUE; SHIFT_BY words used.
flag_value() {
  local flag="$1"
  shift
  if [[ "$1" == "$flag"=* ]]; then
    FLAG_VALUE="${1#*=}"
    SHIFT_BY=1
  elif [ "$#" -ge 2 ]; then
    FLAG_VALUE="$2"
    SHIFT_BY=2
  else
    die "$flag needs a value"
  fi
}

# tpu_runtime TYPE: the TPU VM software version for an accelerator type (Cloud TPU docs,
# "TPU software versions"): Ubuntu 22.04 base images with Python 3.10 (the install step
# adds Python 3.11).
tpu_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) printf 'tpu-ubuntu2204-base' ;;
    v5litepod-* | v5e-*) printf 'v2-alpha-tpuv5-lite' ;;
    v5p-*) printf 'v2-alpha-tpuv5' ;;
    v6e-*) printf 'v2-alpha-tpuv6e' ;;
    *) die "no default TPU software version for accelerator type '$1': pass --version" ;;
  esac
}

# check_settings: validates names before anything runs (no gcloud call needed).
check_settings() {
  [[ "$T2I_NAME" =~ ^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$ ]] \
    || die "--name '$T2I_NAME': lowercase letters, digits and hyphens, starting with a letter"
  [[ "$T2I_ZONE" =~ ^[a-z]+-[a-z0-9]+-[a-z]$ ]] || die "--zone '$T2I_ZONE': e.g. us-central2-b"
  [[ "$T2I_TYPE" =~ ^v[0-9]+[a-z]*-[0-9]+$ ]] \
    || die "--accelerator-type '$T2I_TYPE': e.g. v4-8, v5litepod-8, v4-32"
  if [ -z "$T2I_VERSION" ]; then
    T2I_VERSION="$(tpu_runtime "$T2I_TYPE")" || exit 2
  fi
}

# quote WORD: WORD as one shell word (unchanged when it has no special characters).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_all WORDS...: the words as one shell command line.
quote_all() {
  local out="" word
  for word in "$@"; do
    out+="${out:+ }$(quote "$word")"
  done
  printf '%s' "$out"
}

# run CMD...: prints CMD on stdout under --dry-run; otherwise echoes it to stderr and runs it.
run() {
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\n' "$(quote_all "$@")"
  else
    printf '+ %s\n' "$(quote_all "$@")" >&2
    "$@"
  fi
}

# tpu_vm SUBCOMMAND ARGS...: `gcloud compute tpus tpu-vm SUBCOMMAND ARGS... --zone [--project]`.
tpu_vm() {
  local sub="$1"
  shift
  local cmd=(gcloud compute tpus tpu-vm "$sub" "$@" "--zone=$T2I_ZONE")
  if [ -n "$T2I_PROJECT" ]; then
    cmd+=("--project=$T2I_PROJECT")
  fi
  run "${cmd[@]}"
}

# need_gcloud: a real run needs the gcloud CLI; --dry-run does not.
need_gcloud() {
  if [ "$DRY_RUN" = 0 ] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud is not on PATH (install the Google Cloud CLI, or use --dry-run)"
  fi
}
