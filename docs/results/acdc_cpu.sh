#!/usr/bin/env bash
# CPU accuracy check (issue "The spine"): ACDC, 7 labeled patients, 128x128, 600 steps, labeled-only vs Mean
# Teacher, seeds 1337 and 2024; the LAST checkpoint of each run is evaluated on val.list by `lemis validate`.
# The published schedule is scaled by s = 600/30000 = 1/50 (spec/methods/mean_teacher.md 3b): consistency gate
# 1000 -> 20 steps, ramp epoch 150 -> 3 steps (ramp R = 200 epochs = 600 steps, the whole run, as published);
# weights, decays, LR (poly over the run) as published. Batch 12: labeled-only draws 12 labeled slices,
# Mean Teacher 6 labeled + 6 unlabeled.
# Usage: bash docs/results/acdc_cpu.sh [DATA_ROOT] [train|eval|all]   (default ../shared/data/ACDC all)
set -euo pipefail
ROOT=${1:-../shared/data/ACDC}
STAGE=${2:-all}
PY=${PY:-.venv/bin/python}
DATA=(--data.init_args.root="$ROOT" --data.init_args.patch_size=[128,128] --data.init_args.num_workers=0
      --trainer.enable_progress_bar=false --trainer.logger.init_args.save_dir=runs)
MT=(--data.init_args.labeled_batch_size=6 --model.init_args.consistency_gate_steps=20 --model.init_args.rampup_epoch_len=3)
if [[ $STAGE != eval ]]; then
  for SEED in 1337 2024; do
    "$PY" -m experiments fit --config experiments/acdc/supervised.yaml "${DATA[@]}" --seed_everything=$SEED \
        --trainer.max_steps=600 --trainer.val_check_interval=600 --data.init_args.batch_size=12 \
        --trainer.logger.init_args.name=acdc_cpu_supervised
    "$PY" -m experiments fit --config experiments/acdc/mean_teacher.yaml "${DATA[@]}" --seed_everything=$SEED \
        --trainer.max_steps=600 --trainer.val_check_interval=600 --data.init_args.batch_size=12 "${MT[@]}" \
        --trainer.logger.init_args.name=acdc_cpu_mean_teacher
  done
fi
if [[ $STAGE != train ]]; then
  for METHOD in supervised mean_teacher; do
    for RUN in runs/acdc_cpu_${METHOD}/version_*; do
      "$PY" -m experiments validate --config experiments/acdc/$METHOD.yaml "${DATA[@]}" \
          --ckpt_path="$RUN/checkpoints/last.ckpt" --trainer.logger.init_args.name=acdc_cpu_${METHOD}_last
    done
  done
  "$PY" -m experiments.summarize runs/acdc_cpu_supervised_last/version_* runs/acdc_cpu_mean_teacher_last/version_*
fi
