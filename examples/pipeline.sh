#!/usr/bin/env bash
# One on-policy distillation iteration, stage by stage, from the shell:
#
#     tip rollout | tip score - | tip select - | tip train -     then     tip report
#
# Each stage prints its output directory as the last line of stdout, and `-` makes the
# next stage read that path from stdin; progress and tables go to stderr.
#
#     bash examples/pipeline.sh                  # the embedded addition task (~30 s)
#     QUICK=1 bash examples/pipeline.sh          # few prompts, few tokens, 2 steps
#     STUDENT=s TEACHER=t PROMPTS=p.jsonl WORKDIR=runs/mine bash examples/pipeline.sh
#
# Settings (environment variables, or positional arguments STUDENT TEACHER PROMPTS):
#   STUDENT, TEACHER  model directories / hub ids; default: the addition task's pair that
#                     tip ships (the demo's, tipcli/demo_models)
#   PROMPTS           prompts file; default: addition prompts written into WORKDIR
#   WORKDIR           where the stage directories go (default runs/pipeline); stages
#                     already complete there are resumed, not redone
#   STRATEGY, KEEP    token selection (default soft-or, 0.5)
#   EVAL_PROMPTS      prompts with an `answer` field: `tip eval` grades the student before
#                     and after training (default: the addition task's held-out prompts
#                     when the task's models are used and QUICK is off; else no eval)
#   QUICK=1           4 prompts x 2 samples, 12 new tokens, 2 optimizer steps of 4
set -euo pipefail

QUICK=${QUICK:-0}
STUDENT=${1:-${STUDENT:-}}
TEACHER=${2:-${TEACHER:-}}
PROMPTS=${3:-${PROMPTS:-}}
WORKDIR=${WORKDIR:-runs/pipeline}
STRATEGY=${STRATEGY:-soft-or}
KEEP=${KEEP:-0.5}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}

if [[ "$QUICK" == 1 ]]; then
    N_PROMPTS=4 SAMPLES=2 NEW_TOKENS=12 BATCH=4 STEPS=2 N_EVAL=8
else
    N_PROMPTS=64 SAMPLES=4 NEW_TOKENS=40 BATCH=16 STEPS=16 N_EVAL=200
fi

mkdir -p "$WORKDIR"
default_task=0
if [[ -z "$STUDENT" || -z "$TEACHER" ]]; then
    default_task=1
    models=$("$PYTHON" -c 'from tipcli.demo import SHIPPED_MODELS; print(SHIPPED_MODELS)')
    STUDENT=${STUDENT:-$models/student}
    TEACHER=${TEACHER:-$models/teacher}
fi
# the addition task's prompts: training prompts (seed 1), held-out test prompts (its TEST_SEED)
write_prompts() {  # N SEED FILE
    "$PYTHON" -c 'import sys; from tipcli.tasks.arithmetic import write_prompts as w
print(w(sys.argv[3], int(sys.argv[1]), int(sys.argv[2])))' "$@"
}
if [[ -z "$PROMPTS" ]]; then
    PROMPTS=$(write_prompts "$N_PROMPTS" 1 "$WORKDIR/prompts.jsonl")
fi
if [[ -z "${EVAL_PROMPTS:-}" && "$default_task" == 1 && "$QUICK" != 1 ]]; then
    EVAL_PROMPTS=$(write_prompts "$N_EVAL" 12345 "$WORKDIR/eval-prompts.jsonl")
fi
EVAL_PROMPTS=${EVAL_PROMPTS:-}

echo "student  $STUDENT" >&2
echo "teacher  $TEACHER" >&2
echo "prompts  $PROMPTS" >&2

# the four stages, joined by pipes (pipefail: any stage failing fails the line)
tip rollout --student "$STUDENT" --prompts "$PROMPTS" --max-prompts "$N_PROMPTS" \
        --num-samples "$SAMPLES" --max-new-tokens "$NEW_TOKENS" --seed "$SEED" \
        -o "$WORKDIR/rollout" \
    | tip score - --teacher "$TEACHER" --teacher-top-k 16 -o "$WORKDIR/score" \
    | tip select - --strategy "$STRATEGY" --keep "$KEEP" --seed "$SEED" -o "$WORKDIR/select" \
    | tip train - --lr 1e-4 --train-batch-size "$BATCH" --max-steps "$STEPS" --seed "$SEED" \
        -o "$WORKDIR/train" >/dev/null

# what was selected: quadrants, (h, d) histogram, strategy coverage
tip report "$WORKDIR/select" --json "$WORKDIR/report.json" --png "$WORKDIR/report.png" \
    >/dev/null

if [[ -n "$EVAL_PROMPTS" ]]; then
    for model in before:"$STUDENT" after:"$WORKDIR/train"; do
        tip eval --model "${model#*:}" --prompts "$EVAL_PROMPTS" --verifier last-number \
            --max-new-tokens "$NEW_TOKENS" --max-prompts "$N_EVAL" \
            -o "$WORKDIR/eval-${model%%:*}" >/dev/null
    done
fi

echo "$WORKDIR"
