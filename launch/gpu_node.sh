#!/usr/bin/env bash
# AdvUnlearn on a GPU node: one process drives every local GPU (JAX puts them all in one mesh). Run from the
# repo root:
#
#   launch/gpu_node.sh --config=configs/style.py --workdir=workdirs/style [--gpus=0,1,2,3] [--setup] [--dry-run] \
#     [-- --config.train.lr=1e-5]
#
# --setup creates .venv with requirements.txt and the matching jax[cuda12] wheel first. Several nodes: run the
# same command on each with --num-nodes=N --node-rank=I --coordinator=HOST0:PORT and a workdir on a filesystem
# all nodes share. A rerun of the same command resumes from the workdir's latest checkpoint.
# --dry-run prints every command instead of running it.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "$0")/common.sh"

config="" workdir="" gpus="" setup=0 num_nodes=1 node_rank=0 coordinator=""

usage() { sed -n '2,/^set /p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }

split_at_passthrough "$@"
for arg in "${args[@]}"; do
  case "$arg" in
    --config=*) config="${arg#*=}" ;;
    --workdir=*) workdir="${arg#*=}" ;;
    --gpus=*) gpus="${arg#*=}" ;;
    --num-nodes=*) num_nodes="${arg#*=}" ;;
    --node-rank=*) node_rank="${arg#*=}" ;;
    --coordinator=*) coordinator="${arg#*=}" ;;
    --setup) setup=1 ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage 0 ;;
    *) die "unknown argument '$arg' (see --help)" ;;
  esac
done

[[ -n "$config" ]] || die "--config is required (see --help)"
[[ -n "$workdir" ]] || die "--workdir is required (see --help)"
[[ "$num_nodes" =~ ^[1-9][0-9]*$ ]] || die "--num-nodes must be a positive integer, got '$num_nodes'"
if [[ ! "$node_rank" =~ ^[0-9]+$ ]] || ((node_rank >= num_nodes)); then
  die "--node-rank must be in [0, $num_nodes), got '$node_rank'"
fi
if ((num_nodes > 1)) && [[ -z "$coordinator" ]]; then
  die "--num-nodes=$num_nodes needs --coordinator=HOST:PORT (node 0's address)"
fi
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus must look like 0,1,2,3, got '$gpus'"

cd "$repo_root"
if ((setup)); then
  run python3 -m venv .venv
  run .venv/bin/pip install -q -r requirements.txt "jax[cuda12]==$(jax_version)"
fi

environment=(
  # Let JAX grow GPU memory as needed instead of taking 75% up front (the bank and previews come and go).
  XLA_PYTHON_CLIENT_PREALLOCATE=false
  # Overlap the data-parallel gradient all-reduce with the backward pass.
  XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
)
[[ -n "$gpus" ]] && environment+=(CUDA_VISIBLE_DEVICES="$gpus")
command=(.venv/bin/python -m advunlearn_jax.main "--config=$config" "--workdir=$workdir")
if ((num_nodes > 1)); then
  command+=("--coordinator_address=$coordinator" "--num_processes=$num_nodes" "--process_id=$node_rank")
fi
run env "${environment[@]}" "${command[@]}" "${extra[@]}"
