#!/usr/bin/env bash
# Shared by scripts/pretrain.sh and scripts/finetune.sh (which set DEFAULT_RECIPE): start `python -m mlcd_vl.train`
# on every GPU of this node with torchrun, or across the hosts of HOSTFILE with the deepspeed launcher.
#
# Environment (upstream's names and defaults):
#   NUM_GPUS=8 NNODES=1 NODE_RANK=0 MASTER_ADDR=localhost MASTER_PORT=29500
#   RECIPE       the recipe YAML (default: the script's MLCD bigG-448 recipe)
#   HOSTFILE     when set, launch with `deepspeed --hostfile HOSTFILE` instead of torchrun: from the first host, which
#                starts every host's processes over passwordless ssh (pdsh); NNODES and NUM_GPUS pick from the file
#   NO_SSH=1     with HOSTFILE: no ssh, start this script on every host with its NODE_RANK (DeepSpeed's --no_ssh)
#   PYTHON       interpreter (default: $MLCD_VL_VENV or the repository's .venv if present, else python)
# Arguments are recipe overrides (section.key=value), passed through, e.g. data.train=... optim.max_steps=10.
# The recipe is checked first: a recipe with batch.global_batch_size that does not fit the launch stops here; the
# run prints its effective global batch (per device x GPUs x nodes x accumulation) when it starts.
set -euo pipefail
cd "$(dirname "$0")/.."

NUM_GPUS=${NUM_GPUS:-8} NNODES=${NNODES:-1} NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-localhost} MASTER_PORT=${MASTER_PORT:-29500}
RECIPE=${RECIPE:-${DEFAULT_RECIPE:?set RECIPE}}
if [[ -z ${PYTHON:-} ]]; then
  VENV=${MLCD_VL_VENV:-.venv}
  if [[ -x $VENV/bin/python ]]; then PYTHON=$VENV/bin/python; else PYTHON=python; fi
fi
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
if command -v nvidia-smi >/dev/null 2>&1; then
  export ACCELERATE_CPU_AFFINITY=${ACCELERATE_CPU_AFFINITY:-1}  # as upstream; needs GPUs
fi

# The tiny CPU recipes read the playground's synthetic data (playground/README.md): write it on first use, unless
# an override points data.train elsewhere. playground.json is written last, so it marks a complete folder.
PLAYGROUND=playground/tiny/data
if [[ -f $RECIPE ]] && grep -q "$PLAYGROUND/" "$RECIPE" && [[ ! -f $PLAYGROUND/playground.json ]] \
    && ! printf '%s\n' "$@" | grep -q '^data\.train='; then
  echo "[launch] writing the tiny recipes' data to $PLAYGROUND (python -m mlcd_vl.demo.playground, ~15 s)"
  "$PYTHON" -m mlcd_vl.demo.playground "$PLAYGROUND" >/dev/null
fi

"$PYTHON" -m mlcd_vl.train.launch --quiet "$RECIPE" --world-size $((NUM_GPUS * NNODES)) "$@"

if [[ -n ${HOSTFILE:-} ]]; then
  NO_SSH_ARGS=()
  if [[ ${NO_SSH:-0} == 1 ]]; then NO_SSH_ARGS=(--no_ssh --node_rank "$NODE_RANK"); fi
  exec "$PYTHON" -m deepspeed.launcher.runner --hostfile "$HOSTFILE" --num_nodes "$NNODES" --num_gpus "$NUM_GPUS" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no_local_rank "${NO_SSH_ARGS[@]}" \
    --module mlcd_vl.train "$RECIPE" "$@"
fi
exec "$PYTHON" -m torch.distributed.run --nproc_per_node "$NUM_GPUS" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m mlcd_vl.train "$RECIPE" "$@"
