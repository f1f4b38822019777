#!/usr/bin/env bash
# The paper's sweep: aligned starting model -> six objectives x token budgets -> evaluation -> report.
#
#   ./run_all.sh                         # CPU-sized default (embedded SmolLM2, small budgets)
#   ./run_all.sh --paper                 # the paper's budgets 25k..800k tokens, full evaluation (GPU)
#   ./run_all.sh --budgets "8000 32000" --objectives "sft orpo" --model path/or/hub-id --seeds "0 1"
#
# Re-running skips every run that has a finished run.json and an eval.json, so an interrupted
# sweep resumes where it stopped.
set -euo pipefail
cd "$(dirname "$0")"

BUDGETS="4000 16000"
OBJECTIVES="sft dpo cft inoculation orpo kl_sft"
MODEL=smollm2-135m-instruct
DATASET=arithmetic
SEEDS=0
RUNS=runs
RESULTS=results
SAFETY_STEPS=180
TRAIN_ARGS=""
EVAL_ARGS="--limit 15 --math-limit 30 --max-new-tokens 64 --math-new-tokens 96"
while [ $# -gt 0 ]; do
  case "$1" in
    --paper) BUDGETS="25000 50000 100000 200000 400000 800000"; EVAL_ARGS=""; shift ;;
    --budgets) BUDGETS="$2"; shift 2 ;;
    --objectives) OBJECTIVES="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --dataset) DATASET="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --safety-steps) SAFETY_STEPS="$2"; shift 2 ;;
    --train-args) TRAIN_ARGS="$2"; shift 2 ;;
    --eval-args) EVAL_ARGS="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done
for o in $OBJECTIVES; do
  [ -f "$o.py" ] || { echo "error: unknown objective '$o'; choose from sft dpo cft inoculation orpo kl_sft" >&2; exit 2; }
done

bash setup.sh
PY=.venv/bin/python
export PYTHONUNBUFFERED=1
T0=$(date +%s)
n_budgets=$(wc -w <<<"$BUDGETS"); n_obj=$(wc -w <<<"$OBJECTIVES"); n_seeds=$(wc -w <<<"$SEEDS")
TOTAL=$(( 2 + 2 * n_budgets * n_obj * n_seeds ))   # start model (train + eval), then train + eval per run
K=0
progress() {  # progress "what": one line per stage with elapsed and a naive estimate of what is left
  K=$((K + 1)); local now=$(( $(date +%s) - T0 ))
  local left=$(( K > 1 ? now * (TOTAL - K + 1) / (K - 1) : 0 ))
  printf '\n[%d/%d] %s | elapsed %dm%02ds | est. remaining %dm%02ds\n' "$K" "$TOTAL" "$1" $((now/60)) $((now%60)) $((left/60)) $((left%60))
}
finished() { [ -f "$1/run.json" ] && grep -q '"finished": true' "$1/run.json"; }

# 1. The starting model. The embedded SmolLM2 refuses few harmful requests, so it is first made into an
#    aligned model organism by safety SFT (cached in $RUNS/safety); a real aligned model is used as is.
if [ "$MODEL" = smollm2-135m-instruct ]; then
  START=$RUNS/safety
  progress "starting model: safety-tuning the embedded model into an aligned one ($START)"
  if finished "$START"; then echo "cached: $START"; else
    echo "The embedded model refuses only ~10% of harmful prompts; making an aligned starting model first."
    $PY sft.py --dataset safety --steps "$SAFETY_STEPS" --out "$START" --overwrite
  fi
  BASE_EVAL=$START/eval.json
else
  START=$MODEL
  progress "starting model: $START (used as given)"
  BASE_EVAL=$RESULTS/$(echo "$MODEL" | sed 's#^/##; s#[^A-Za-z0-9_.-]\+#_#g')/eval.json
fi
progress "evaluating the starting model"
[ -f "$BASE_EVAL" ] && echo "cached: $BASE_EVAL" || $PY evaluate.py "$START" --results "$RESULTS" $EVAL_ARGS

# 2-3. Every objective at every budget from the same start, same seed, same data order; then evaluate.
ALL=()
for seed in $SEEDS; do
  for budget in $BUDGETS; do
    for obj in $OBJECTIVES; do
      out=$RUNS/$obj-$budget-s$seed
      ALL+=("$out")
      progress "train $obj, budget $budget tokens, seed $seed -> $out"
      if finished "$out"; then echo "cached: $out"; else
        $PY "$obj.py" --model "$START" --dataset "$DATASET" --max-tokens "$budget" --steps 1000000 --seed "$seed" \
          --out "$out" --overwrite --log-every 5 $TRAIN_ARGS
      fi
      progress "evaluate $out"
      [ -f "$out/eval.json" ] && echo "cached: $out/eval.json" || $PY evaluate.py "$out" --base "$BASE_EVAL" $EVAL_ARGS
    done
  done
done

# 4. The report: summary.csv, summary.md, plots.
$PY evaluate.py --summarize "${ALL[@]}" --base "$BASE_EVAL" --results "$RESULTS"
now=$(( $(date +%s) - T0 )); echo "sweep done in $((now/60))m$((now%60))s; see $RESULTS/summary.md"
