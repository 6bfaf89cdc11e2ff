#!/usr/bin/env bash
# CPU accuracy check (issues "The spine" and "SGRS-Net"): ACDC, 7 labeled patients, 128x128, 600 steps,
# labeled-only vs Mean Teacher vs SGRS, seeds 1337 and 2024; the LAST checkpoint of each run is evaluated on
# val.list by `lemis validate`. Batch 12: labeled-only draws 12 labeled slices, MT and SGRS 6 labeled + 6 unlabeled.
# Schedules scaled by s = max_steps / published steps (spec/methods/mean_teacher.md 3b), weights/decays/LR as
# published (poly over the run):
#   MT   s = 600/30000: consistency gate 1000 -> 20 steps, ramp epoch 150 -> 3 steps (R = 200 epochs = the run).
#   SGRS s = 600/30000: ramp epoch 150 -> 3 steps (R = 40 epochs = 120 steps, 20 % of the run, as 6000/30000).
# Usage: bash docs/results/acdc_cpu.sh [DATA_ROOT] [train|eval|all] [METHODS...]
#        (defaults: ../shared/data/ACDC all supervised mean_teacher sgrs)
set -euo pipefail
ROOT=${1:-../shared/data/ACDC}
STAGE=${2:-all}
shift $(( $# < 2 ? $# : 2 ))
read -r -a METHODS <<< "${*:-supervised mean_teacher sgrs}"
PY=${PY:-.venv/bin/python}
read -r -a SEEDS <<< "${SEEDS:-1337 2024}"  # e.g. SEEDS=2024 to run one seed per process
DATA=(--data.init_args.root="$ROOT" --data.init_args.patch_size=[128,128] --data.init_args.num_workers=0
      --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir=runs)
declare -A EXTRA=(
  [supervised]=""
  [mean_teacher]="--data.init_args.labeled_batch_size=6 --model.init_args.consistency_gate_steps=20
                  --model.init_args.rampup_epoch_len=3"
  [sgrs]="--data.init_args.labeled_batch_size=6 --model.init_args.rampup_epoch_len=3"
)
if [[ $STAGE != eval ]]; then
  for SEED in "${SEEDS[@]}"; do
    for METHOD in "${METHODS[@]}"; do
      # shellcheck disable=SC2086
      "$PY" -m experiments fit --config experiments/acdc/$METHOD.yaml "${DATA[@]}" ${EXTRA[$METHOD]} \
          --seed_everything=$SEED --trainer.max_steps=600 --trainer.val_check_interval=600 \
          --data.init_args.batch_size=12 --trainer.logger.init_args.name=acdc_cpu_$METHOD
    done
  done
fi
if [[ $STAGE != train ]]; then
  RUNS=()
  for METHOD in "${METHODS[@]}"; do
    for RUN in runs/acdc_cpu_${METHOD}/version_*; do
      "$PY" -m experiments validate --config experiments/acdc/$METHOD.yaml "${DATA[@]}" \
          --ckpt_path="$RUN/checkpoints/last.ckpt" --trainer.logger.init_args.name=acdc_cpu_${METHOD}_last
    done
    RUNS+=(runs/acdc_cpu_${METHOD}_last/version_*)
  done
  "$PY" -m experiments.summarize "${RUNS[@]}"
fi
