#!/usr/bin/env bash
# Score a checkpoint on the MLCD table's benchmarks with lmms-eval 0.7.3 and the `mlcd_llava` model.
#
#   scripts/eval.sh MODEL_DIR [TASKS] [NUM_GPUS] [BATCH_SIZE] [OUTPUT_DIR]
#
#   MODEL_DIR   HF-native folder, upstream-format checkpoint (converted once, beside it) or hub id
#   TASKS       comma-separated (default chartqa,docvqa_val,infovqa_val,ocrbench,mmmu_val); the groups mmmu,
#               docvqa and infovqa become their scored val tasks (the test halves have no labels)
#   NUM_GPUS    processes, one per GPU; >1 runs data parallel under `accelerate launch --multi_gpu`
#               (default 1; torchrun works too: torchrun --nproc_per_node N -m mlcd_vl.eval.cli lmms ...)
#   BATCH_SIZE  requests per generate call on each process (default 1, as upstream; 8 is much faster and gives
#               the same greedy answers in float32)
#   OUTPUT_DIR  default eval_out/<model name>-<date>
#
# Environment:
#   MLCD_VL_EVAL_DATA=DIR       offline: read the benchmarks from DIR (<stem>.parquet or <stem>/*.parquet, stems
#                               chartqa docvqa_val infovqa_val ocrbench mmmu_val; `mlcd-vl eval make-synthetic`
#                               writes such a folder); the official task names map to the mlcd_*_local tasks and
#                               HF_HUB_OFFLINE / HF_DATASETS_OFFLINE are set
#   MLCD_VL_EVAL_MODEL_ARGS     extra model_args, e.g. "dtype=float16,repetition_penalty=checkpoint"
#   MLCD_VL_EVAL_EXTRA          extra lmms-eval arguments, e.g. "--limit 20 --gen_kwargs max_new_tokens=8"
#   PYTHON                      interpreter (default: $MLCD_VL_VENV or the repository's .venv if present, else python)
#   MAIN_PROCESS_PORT           accelerate's port for NUM_GPUS>1 (default 29512)
#
# lmms-eval exits 0 even when a run fails; this script checks that it wrote a results file holding every metric
# of every task, fails loudly otherwise, then writes OUTPUT_DIR/summary.md with `mlcd-vl eval summarize`.
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
[[ $# -ge 1 && $1 != -h && $1 != --help ]] || usage

REPO="$(cd "$(dirname "$0")/.." && pwd)"
MODEL="$1"
TASKS="${2:-chartqa,docvqa_val,infovqa_val,ocrbench,mmmu_val}"
NUM_GPUS="${3:-1}"
BATCH_SIZE="${4:-1}"
OUTPUT_DIR="${5:-eval_out/$(basename "$MODEL")-$(date +%Y%m%d-%H%M%S)}"
if [[ -z "${PYTHON:-}" ]]; then
  VENV=${MLCD_VL_VENV:-$REPO/.venv}
  if [[ -x "$VENV/bin/python" ]]; then PYTHON="$VENV/bin/python"; else PYTHON=python; fi
fi

fail() { echo "eval.sh: FAILED: $*" >&2; exit 1; }
[[ "$NUM_GPUS" =~ ^[1-9][0-9]*$ ]] || fail "NUM_GPUS must be a positive integer, got '$NUM_GPUS'"
[[ "$BATCH_SIZE" =~ ^[1-9][0-9]*$ ]] || fail "BATCH_SIZE must be a positive integer, got '$BATCH_SIZE'"
# a missing folder (or, offline, a hub id that is not cached) stops here in one line, before lmms-eval starts
"$PYTHON" -m mlcd_vl.model.sources "$MODEL" --prog eval.sh >/dev/null || exit 2
mkdir -p "$OUTPUT_DIR"
OUTPUT_DIR="$(cd "$OUTPUT_DIR" && pwd)"
[[ -d "$MODEL" ]] && MODEL="$(cd "$MODEL" && pwd)"  # lmms-eval runs from the repository root

mapped=()
IFS=',' read -ra requested <<< "$TASKS"
for task in "${requested[@]}"; do
  case "$task" in
    mmmu|docvqa|infovqa) mapped+=("${task}_val") ;;
    "") ;;
    *) mapped+=("$task") ;;
  esac
done
TASKS="$(IFS=','; echo "${mapped[*]}")"

INCLUDE=()
if [[ -n "${MLCD_VL_EVAL_DATA:-}" ]]; then
  [[ -d "$MLCD_VL_EVAL_DATA" ]] || fail "MLCD_VL_EVAL_DATA=$MLCD_VL_EVAL_DATA is not a folder"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  "$PYTHON" -m mlcd_vl.eval.cli tasks "$MLCD_VL_EVAL_DATA" "$OUTPUT_DIR/tasks" >/dev/null \
    || fail "no benchmark data found in $MLCD_VL_EVAL_DATA"
  INCLUDE=(--include_path "$OUTPUT_DIR/tasks")
  mapped=()
  IFS=',' read -ra requested <<< "$TASKS"
  for task in "${requested[@]}"; do
    case "$task" in
      chartqa|docvqa_val|infovqa_val|ocrbench|mmmu_val) mapped+=("mlcd_${task}_local") ;;
      *) mapped+=("$task") ;;
    esac
  done
  TASKS="$(IFS=','; echo "${mapped[*]}")"
  for task in "${mapped[@]}"; do
    if [[ $task == mlcd_*_local && ! -f "$OUTPUT_DIR/tasks/$task.yaml" ]]; then
      fail "$task: no data for it in $MLCD_VL_EVAL_DATA"
    fi
  done
fi

MODEL_ARGS="pretrained=$MODEL${MLCD_VL_EVAL_MODEL_ARGS:+,$MLCD_VL_EVAL_MODEL_ARGS}"
read -ra EXTRA <<< "${MLCD_VL_EVAL_EXTRA:-}"
LMMS=(-m mlcd_vl.eval.cli lmms --model mlcd_llava --model_args "$MODEL_ARGS" --tasks "$TASKS"
      --batch_size "$BATCH_SIZE" --output_path "$OUTPUT_DIR" --log_samples "${INCLUDE[@]}" "${EXTRA[@]}")
if (( NUM_GPUS > 1 )); then
  # explicit flags: a stale `accelerate config` must not change the launch (lmms-eval issue #482)
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --multi_gpu --num_processes "$NUM_GPUS" --num_machines 1
          --mixed_precision no --dynamo_backend no --main_process_port "${MAIN_PROCESS_PORT:-29512}")
else
  LAUNCH=("$PYTHON")
fi

MARKER="$OUTPUT_DIR/.started"
touch "$MARKER"
sleep 1  # results written by this run are strictly newer than the marker
echo "eval.sh: ${LAUNCH[*]} ${LMMS[*]}" | tee "$OUTPUT_DIR/command.txt"
status=0
(cd "$REPO" && "${LAUNCH[@]}" "${LMMS[@]}") 2>&1 | tee "$OUTPUT_DIR/lmms_eval.log" || status=$?
(( status == 0 )) || fail "lmms-eval exited with status $status (log: $OUTPUT_DIR/lmms_eval.log)"

mapfile -t RESULTS < <(find "$OUTPUT_DIR" -name '*_results.json' -newer "$MARKER" | sort)
if (( ${#RESULTS[@]} == 0 )); then
  grep -E "Error|Traceback|Exception" "$OUTPUT_DIR/lmms_eval.log" | tail -n 20 >&2 || true
  fail "lmms-eval wrote no results file (it exits 0 on errors; log: $OUTPUT_DIR/lmms_eval.log)"
fi
"$PYTHON" -m mlcd_vl.eval.cli summarize "${RESULTS[@]}" --require "$TASKS" --output "$OUTPUT_DIR/summary.md" \
  || fail "lmms-eval's results lack requested tasks or metrics (log: $OUTPUT_DIR/lmms_eval.log)"
echo "eval.sh: results: ${RESULTS[*]}"
echo "eval.sh: summary: $OUTPUT_DIR/summary.md"
