#!/usr/bin/env bash
# AdvUnlearn on a Cloud TPU VM slice (single- or multi-host): create the slice, install this checkout on every
# worker, run the same command on all workers (JAX's multi-controller runtime connects them), copy the results
# back, delete the slice.
#
#   launch/tpu_vm.sh --name=advunlearn-style --zone=us-central2-b --accelerator=v4-16 --bucket=my-bucket \
#     --config=configs/style.py --workdir=style_vangogh [--spot] [--keep] [--dry-run] [-- --config.train.lr=1e-5]
#
# What the workers run is the committed tree of this checkout (`git archive`, --ref=HEAD by default), copied to
# every worker with `gcloud compute tpus tpu-vm scp`; uncommitted changes are not sent (the script says so). With
# --repo=URL [--ref=BRANCH] the workers clone that repository instead.
#
# With --sweep=KEY=V1,V2,... (repeatable) the slice runs a population instead (advunlearn_jax.population): each
# worker is its own single-host slice, trains every N-th member of the grid (N workers) over its own chips, and
# writes them to the shared workdir; flags after "--" then go to advunlearn_jax.population.
# The workdir lives in the GCS bucket, mounted with gcsfuse at the same path on every worker: all hosts see one
# Orbax checkpoint directory, and it outlives the slice. With --spot a preempted slice is deleted, recreated and
# the same command run again, which resumes from the workdir's latest checkpoint (up to --max-restarts times).
# --dry-run prints every command instead of running it.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

name="" zone="" accelerator="" bucket="" config="" workdir="" version="tpu-ubuntu2204-base"
repo="" ref="" project=""
spot=0 keep=0 dry_run=0 max_restarts=5 local_out="workdirs" sweeps=()

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

split_at_passthrough "$@"
for arg in "${args[@]}"; do
  case "$arg" in
    --name=*) name="${arg#*=}" ;;
    --zone=*) zone="${arg#*=}" ;;
    --project=*) project="${arg#*=}" ;;
    --accelerator=*) accelerator="${arg#*=}" ;;
    --version=*) version="${arg#*=}" ;;
    --bucket=*) bucket="${arg#*=}" ;;
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --repo=*) repo="${arg#*=}" ;;
    --ref=*) ref="${arg#*=}" ;;
    --local-out=*) local_out="${arg#*=}" ;;
    --max-restarts=*) max_restarts="${arg#*=}" ;;
    --sweep=*) sweeps+=("$arg") ;;
    --spot) spot=1 ;;
    --keep) keep=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

for required in name zone accelerator bucket config workdir; do
  [[ -n "${!required}" ]] || die "--$required is required (see --help)"
done
[[ "$max_restarts" =~ ^[0-9]+$ ]] || die "--max-restarts must be a non-negative integer, got '$max_restarts'"

mount="/mnt/$bucket"
remote_workdir="$mount/$workdir"
gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")

archive="${TMPDIR:-/tmp}/advunlearn-jax-$name.tar.gz"  # the checkout's committed tree, sent to every worker

on_all_workers() { run "${gcloud_tpu[@]}" ssh "$name" "${where[@]}" --worker=all --command="$1"; }
in_repo="cd advunlearn-jax && . .venv/bin/activate"  # where install() left the checkout and its venv

create() {
  local flags=(--accelerator-type="$accelerator" --version="$version")
  ((spot)) && flags+=(--spot)
  run "${gcloud_tpu[@]}" create "$name" "${where[@]}" "${flags[@]}"
}

# The code the workers run: this checkout's committed tree (default) or a clone of --repo. Replacing the tree
# keeps the worker's .venv, so a reinstall after a preemption only updates what changed.
install() {
  local fetch
  if [[ -n "$repo" ]]; then
    fetch="([ -d advunlearn-jax/.git ] || git clone -q $(quote "$repo") advunlearn-jax) \
&& git -C advunlearn-jax fetch -q && git -C advunlearn-jax checkout -q $(quote "${ref:-main}")"
  else
    if ! ((dry_run)) && [[ -n "$(git -C "$repo_root" status --porcelain --untracked-files=no)" ]]; then
      echo "note: uncommitted changes in $repo_root are not sent; the workers run ${ref:-HEAD}" >&2
    fi
    run git -C "$repo_root" archive --format=tar.gz --output="$archive" "${ref:-HEAD}"
    run "${gcloud_tpu[@]}" scp "$archive" "$name:advunlearn-jax.tar.gz" "${where[@]}" --worker=all
    fetch="mkdir -p advunlearn-jax && find advunlearn-jax -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} + \
&& tar -xzf advunlearn-jax.tar.gz -C advunlearn-jax"
  fi
  on_all_workers "set -e; sudo mkdir -p $mount && sudo chown \$USER $mount \
&& (mountpoint -q $mount || gcsfuse --implicit-dirs $bucket $mount); $fetch; cd advunlearn-jax \
&& python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements.txt 'jax[tpu]==$(jax_version)'"
}

train() {
  if ((${#sweeps[@]})); then
    population
    return
  fi
  # Every worker runs the same command; jax.distributed.initialize finds the slice's other workers itself.
  on_all_workers "$in_repo && $(quote python -m advunlearn_jax.main \
    "--config=$config" "--workdir=$remote_workdir" "${extra[@]}")"
}

# Independent runs need no collectives between workers, so each worker runs alone: the TPU_* variables make it a
# single-host slice, and the worker's number and the worker count (instance metadata) pick its members. The split
# is the same on a recreated slice, so after a preemption each worker resumes its own members.
population() {
  local metadata="http://metadata.google.internal/computeMetadata/v1/instance/attributes"
  on_all_workers "$in_repo \
&& part=\$(curl -sf -H Metadata-Flavor:Google $metadata/agent-worker-number) \
&& parts=\$(curl -sf -H Metadata-Flavor:Google $metadata/worker-network-endpoints | tr , '\\n' | grep -c .) \
&& export TPU_HOST_BOUNDS=1,1,1 TPU_WORKER_ID=0 TPU_WORKER_HOSTNAMES=localhost \
&& $(quote python -m advunlearn_jax.population "--config=$config" "--workdir=$remote_workdir" "${sweeps[@]}" \
    "${extra[@]}") --part=\"\$part\" --parts=\"\$parts\""
}

preempted() {
  ((dry_run)) && return 1
  local state
  state=$("${gcloud_tpu[@]}" describe "$name" "${where[@]}" --format='value(state)' || echo GONE)
  [[ "$state" == PREEMPTED || "$state" == GONE || "$state" == TERMINATED ]]
}

delete() { run "${gcloud_tpu[@]}" delete "$name" "${where[@]}" --quiet; }

# From the bucket, not a worker: it works after a preemption too.
copy_back() {
  run mkdir -p "$local_out"
  run gcloud storage cp --recursive "gs://$bucket/$workdir" "$local_out/"
}

attempt=0
create
install
until train; do
  if ((spot)) && preempted && ((attempt < max_restarts)); then
    attempt=$((attempt + 1))
    echo "slice $name was preempted; recreating it (restart $attempt of $max_restarts), the run resumes" >&2
    delete
    create
    install
  else
    echo "the run failed and the slice was not preempted; it is kept for inspection: $name" >&2
    exit 1
  fi
done
copy_back
((keep)) || delete
