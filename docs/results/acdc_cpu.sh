#!/usr/bin/env bash
# CPU accuracy check (issue "The spine"): ACDC, 7 labeled patients, 128x128, 600 steps, labeled-only vs Mean
# Teacher, seeds 1337 and 2024, last checkpoint evaluated on val.list. The published schedule is scaled by
# s = 600/30000 = 1/50 (spec/methods/mean_teacher.md 3b): consistency gate 1000 -> 20 steps, ramp epoch
# 150 -> 3 steps (ramp R = 200 epochs = 600 steps, the whole run, as published); weights and decays as published.
# Batch 12: labeled-only draws 12 labeled slices, Mean Teacher 6 labeled + 6 unlabeled.
# Usage: bash docs/results/acdc_cpu.sh [DATA_ROOT]   (default ../shared/data/ACDC); then see the summary.
set -euo pipefail
ROOT=${1:-../shared/data/ACDC}
PY=${PY:-.venv/bin/python}
COMMON=(--trainer.max_steps=600 --trainer.val_check_interval=600 --trainer.enable_progress_bar=false
        --data.init_args.root="$ROOT" --data.init_args.patch_size=[128,128] --data.init_args.batch_size=12
        --data.init_args.num_workers=0 --trainer.logger.init_args.save_dir=runs)
for SEED in 1337 2024; do
  "$PY" -m experiments fit --config experiments/acdc/supervised.yaml "${COMMON[@]}" --seed_everything=$SEED \
      --trainer.logger.init_args.name=acdc_cpu_supervised
  "$PY" -m experiments fit --config experiments/acdc/mean_teacher.yaml "${COMMON[@]}" --seed_everything=$SEED \
      --data.init_args.labeled_batch_size=6 --model.init_args.consistency_gate_steps=20 \
      --model.init_args.rampup_epoch_len=3 --trainer.logger.init_args.name=acdc_cpu_mean_teacher
done
"$PY" -m experiments.summarize runs/acdc_cpu_supervised/version_* runs/acdc_cpu_mean_teacher/version_*
