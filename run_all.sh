#!/usr/bin/env bash
# The paper's sweep: aligned starting model -> every objective x token budgets -> evaluation -> report.
#
#   ./run_all.sh                          # CPU-sized default (embedded SmolLM2, open-ended task, small budgets)
#   ./run_all.sh --frontier               # the controlled comparison: 3 seeds, constraint variants (long)
#   ./run_all.sh --paper --jobs 6         # the paper's budgets 25k..800k tokens, full evaluation (GPU)
#   ./run_all.sh --budgets "8000 32000" --objectives "sft orpo" --dataset arithmetic --jobs 2 --seeds "0 1"
#   ./run_all.sh --variants "kl_sft:--beta 2" "orpo:--lam 1"   # an objective with other settings, as its own line
#   ./run_all.sh --model path/or/hub-id   # start from an aligned chat model as it is
#
# Budgets are nested: each objective trains once, to the largest budget, saving a snapshot at every
# smaller one (--save-at-tokens; the learning rate is constant after warm-up, so a snapshot equals a
# separate shorter run). --jobs N runs up to N objectives (training, then evaluating its snapshots)
# at once: on a GPU several small-model processes share the chip; on a CPU each job gets its share of
# the cores (OMP_NUM_THREADS = cores / N; unsplit, two torch processes slow each other about 5x).
# Re-running skips what is finished, so a sweep resumes.
# The embedded start is the shipped adapter assets/start (made by the command in assets/start/README.md);
# --remake-start trains it again (about 50 min on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")"

BUDGETS="10000 20000 40000"
OBJECTIVES=""  # default: every objective script (common.objectives() finds them)
MODEL=smollm2-135m-instruct
DATASET=open
SEEDS=0
RUNS=runs
RESULTS=results
JOBS=1
REMAKE_START=0
TRAIN_ARGS=""
EVAL_ARGS=""
VARIANTS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --paper) BUDGETS="25000 50000 100000 200000 400000 800000"; PAPER=1; shift ;;
    --frontier) SEEDS="0 1 2"; RESULTS=results/frontier; shift
                VARIANTS+=("kl_sft:--beta 2" "kl_sft:--beta 8" "orpo:--lam 1" "orpo:--lam 4" "dpo:--beta 0.5") ;;
    --variants) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do VARIANTS+=("$1"); shift; done ;;
    --budgets) BUDGETS="$2"; shift 2 ;;
    --objectives) OBJECTIVES="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --dataset) DATASET="$2"; shift 2 ;;
    --seeds) SEEDS="$2"; shift 2 ;;
    --runs) RUNS="$2"; shift 2 ;;
    --results) RESULTS="$2"; shift 2 ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --remake-start) REMAKE_START=1; shift ;;
    --train-args) TRAIN_ARGS="$2"; shift 2 ;;
    --eval-args) EVAL_ARGS="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see ./run_all.sh --help)" >&2; exit 2 ;;
  esac
done
[[ "$JOBS" =~ ^[1-9][0-9]*$ ]] || { echo "error: --jobs $JOBS: a whole number >= 1" >&2; exit 2; }
for b in $BUDGETS; do [[ "$b" =~ ^[1-9][0-9]*$ ]] || { echo "error: --budgets: '$b' is not a token count" >&2; exit 2; }; done
BUDGETS=$(tr ' ' '\n' <<<"$BUDGETS" | sort -n | uniq | tr '\n' ' ')
LARGEST=$(tr ' ' '\n' <<<"$BUDGETS" | grep . | tail -1)
SMALLER=$(tr ' ' '\n' <<<"$BUDGETS" | grep -v "^$LARGEST\$" | grep . | paste -sd, - || true)
if [ -z "$EVAL_ARGS" ]; then  # capability by task; CPU-sized (3 wrappers, short answers) unless --paper
  case "$DATASET" in
    open) EVAL_ARGS="--open test --skip math" ;;
    *) EVAL_ARGS="--math-limit 30 --math-new-tokens 96" ;;
  esac
  [ "${PAPER:-0}" = 1 ] || EVAL_ARGS="$EVAL_ARGS --open-new-tokens 128 --jailbreaks plain,roleplay,happy_to_help --max-new-tokens 64"
fi

MODEL=${MODEL%/}
bash setup.sh
PY=.venv/bin/python
KNOWN=$($PY -c "import common; print(*common.objectives())")
OBJECTIVES=${OBJECTIVES:-$KNOWN}
for o in $OBJECTIVES ${VARIANTS[@]+"${VARIANTS[@]%%:*}"}; do
  [[ " $KNOWN " == *" $o "* ]] || { echo "error: unknown objective '$o'; choose from $KNOWN" >&2; exit 2; }
done
# The jobs: each objective as it is, then each variant ("OBJECTIVE:FLAGS", named by its flags), per seed.
JOBS_LIST=()
for o in $OBJECTIVES; do JOBS_LIST+=("$o:"); done
for v in ${VARIANTS[@]+"${VARIANTS[@]}"}; do
  [[ "$v" == *:--* ]] || { echo "error: --variants '$v': write OBJECTIVE:FLAGS, e.g. 'kl_sft:--beta 2'" >&2; exit 2; }
  JOBS_LIST+=("$v")
done
export PYTHONUNBUFFERED=1
if [ "$JOBS" -gt 1 ] && [ -z "${OMP_NUM_THREADS:-}" ]; then  # parallel jobs share the CPU cores instead of
  cores=$(nproc 2>/dev/null || echo 1)                       # each taking all of them (which thrashes)
  export OMP_NUM_THREADS=$(( cores / JOBS > 0 ? cores / JOBS : 1 ))
fi
T0=$(date +%s)
say() { local now=$(( $(date +%s) - T0 )); printf '[%dm%02ds] %s\n' $((now/60)) $((now%60)) "$*"; }
finished() { [ -f "$1/run.json" ] && grep -q '"finished": true' "$1/run.json"; }

# 1. The starting model. The embedded SmolLM2 refuses few harmful requests, so the sweep starts from an
#    aligned model organism made of it by safety SFT (shipped as assets/start); a real aligned model is used as is.
if [ "$MODEL" = smollm2-135m-instruct ]; then
  START=$RUNS/start
  if [ "$REMAKE_START" = 1 ]; then
    START=$RUNS/start-remade
    if ! finished "$START"; then
      say "remaking the aligned start (sft.py --dataset safety, about 50 min on 2 CPU cores) -> $START"
      $PY sft.py --dataset safety --steps 480 --decay-steps 100 --out "$START" --overwrite --log-every 20
    fi
  elif ! finished "$START"; then
    mkdir -p "$RUNS" && rm -rf "$START" && cp -r assets/start "$START"
    say "aligned start: the shipped adapter assets/start -> $START"
  fi
  BASE_EVAL=$START/eval.json
else
  START=$MODEL
  BASE_EVAL=$($PY -c "import evaluate, sys; print(evaluate.output_path(sys.argv[1], evaluate.parse([sys.argv[1], '--results', sys.argv[2]])))" "$MODEL" "$RESULTS")
fi
# A --runs folder holds one sweep: resuming it with other settings would mix runs that are not comparable.
SETTINGS="start=$START dataset=$DATASET budgets=$BUDGETS train=[$TRAIN_ARGS] eval=[$EVAL_ARGS]"
mkdir -p "$RUNS"
if [ -f "$RUNS/sweep.txt" ] && [ "$(cat "$RUNS/sweep.txt")" != "$SETTINGS" ]; then
  echo "error: $RUNS holds a sweep with other settings ($(cat "$RUNS/sweep.txt")); pass another --runs or remove it" >&2; exit 2
fi
echo "$SETTINGS" > "$RUNS/sweep.txt"
if [ -f "$BASE_EVAL" ]; then say "cached: $BASE_EVAL"; else
  say "evaluating the starting model"
  $PY evaluate.py "$START" --results "$RESULTS" $EVAL_ARGS
fi

# 2-3. Each objective once to the largest budget, a snapshot at every smaller one; then every snapshot evaluated.
tag_of() { local flags=${1#*:}; flags=${flags//--/}; echo "${flags## }"; }          # "kl_sft:--beta 2" -> "beta 2"
out_of() { local tag; tag=$(tag_of "$1"); tag=${tag//[^A-Za-z0-9.]/}; echo "$RUNS/${1%%:*}${tag:+-$tag}-s$2"; }
job() {  # job OBJECTIVE:FLAGS SEED: train (unless finished), then evaluate each budget's run directory
  local obj=${1%%:*} flags=${1#*:} tag out
  tag=$(tag_of "$1"); out=$(out_of "$1" "$2")
  if ! finished "$out"; then
    $PY "$obj.py" --model "$START" --dataset "$DATASET" --max-tokens "$LARGEST" --steps 1000000 --seed "$2" \
      ${SMALLER:+--save-at-tokens "$SMALLER"} --out "$out" --overwrite --log-every 5 $TRAIN_ARGS $flags \
      ${tag:+--tag "$tag"}
  fi
  for dir in $(run_dirs "$out"); do
    [ -f "$dir/eval.json" ] || $PY evaluate.py "$dir" --base "$BASE_EVAL" $EVAL_ARGS
  done
}
run_dirs() { for d in "$1"/*/ "$1"; do [ ! -f "$d/run.json" ] || echo "${d%/}"; done; }  # a run, its snapshots
mkdir -p "$RUNS/logs"
PIDS=()
trap 'kill $(jobs -p) 2>/dev/null || true' EXIT  # a failed or interrupted sweep leaves no job writing behind it
failed() { echo "error: a job failed; see $RUNS/logs/ (re-running resumes)" >&2; exit 1; }
for seed in $SEEDS; do
  for j in "${JOBS_LIST[@]}"; do
    out=$(out_of "$j" "$seed")
    if [ "$JOBS" = 1 ]; then
      say "${j%%:*} $(tag_of "$j"), seed $seed: train to $LARGEST tokens (snapshots at ${SMALLER:-none}), evaluate -> $out"
      job "$j" "$seed"
    else
      while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || failed; done
      say "started ${out#"$RUNS"/} (log: $RUNS/logs/${out#"$RUNS"/}.log)"
      ( set -e; job "$j" "$seed" > "$RUNS/logs/${out#"$RUNS"/}.log" 2>&1; say "finished ${out#"$RUNS"/}" ) &
      PIDS+=($!)
    fi
  done
done
for pid in ${PIDS[@]+"${PIDS[@]}"}; do wait "$pid" || failed; done  # every job's own exit status

# 4. The report: summary.csv, summary.md, plots.
ALL=()
for seed in $SEEDS; do for j in "${JOBS_LIST[@]}"; do ALL+=($(run_dirs "$(out_of "$j" "$seed")")); done; done
$PY evaluate.py --summarize "${ALL[@]}" --base "$BASE_EVAL" --results "$RESULTS"
now=$(( $(date +%s) - T0 )); echo "sweep done in $((now/60))m$((now%60))s; see $RESULTS/summary.md"
