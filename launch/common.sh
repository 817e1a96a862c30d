# Shared by the launch scripts (sourced, not run): command echo/dry-run and quoting.
# shellcheck shell=bash

dry_run=${dry_run:-0}
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# One shell word per argument, single-quoted only where needed, so printed commands can be pasted.
quote() {
  local arg words=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      words+=("$arg")
    else
      words+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  printf '%s' "${words[*]}"
}

# Splits the script's arguments at the first "--": its own flags into `args`, the rest (flags for
# advunlearn_jax.main, passed through untouched) into `extra`.
split_at_passthrough() {
  # shellcheck disable=SC2034  # both arrays are read by the sourcing script
  args=() extra=()
  local arg seen=0
  for arg in "$@"; do
    if ((seen)); then
      extra+=("$arg")
    elif [[ "$arg" == -- ]]; then
      seen=1
    else
      args+=("$arg")
    fi
  done
}

# Prints the command, then runs it unless --dry-run.
run() {
  printf '+ %s\n' "$(quote "$@")"
  ((dry_run)) || "$@"
}

# The jax version requirements.txt pins: accelerator wheels (jax[tpu], jax[cuda12]) must match it.
jax_version() { sed -n 's/^jax==//p' "$repo_root/requirements.txt"; }

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}
