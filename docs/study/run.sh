#!/usr/bin/env bash
# Run the autoencoder trainings of one study stage side by side, one or more per GPU, each with the
# common settings below plus its own overrides, then collect the validation curves.
#   bash docs/study/run.sh SPEC_FILE DATA_DIR RUNS_DIR
# SPEC_FILE: one run per line, "NAME GPU [VAR=VALUE ...] --key value ...". DATA_DIR holds train/ and val/.
# Two VAR words are the run's, not its environment's: OVERLAY=FILE merges a config over the training
# config, DATASET=NAME trains on DATA_DIR/NAME (a folder or datalist JSON) instead of train/.
# Writes RUNS_DIR/NAME/{log.txt,model_autoencoder.pt,...} and RUNS_DIR/curves.csv.
# A run whose folder already holds a checkpoint_last.pt resumes from it (optimizer, schedule and
# iteration count), so one training can span several calls; STAGE_SECONDS, where set, is each run's
# time_limit in this call.
set -uo pipefail
spec=$1; data=$2; runs=$3
mkdir -p "$runs"
common=(--val_dataset_dir "$data/val" --use_mlflow False --deterministic False
        --patch_size "[128, 128, 64]" --batch_size 2 --learning_rate 2e-4 --epoch_length 500 --val_interval 1
        --num_workers 2 --adv_weight 0)
while read -r name gpu overrides; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  mkdir -p "$runs/$name"
  eval "extra=($overrides)"
  env=()  # leading NAME=VALUE words: this run's environment
  configs="'configs/train_autoencoder.yaml'" dataset=train
  while [[ ${#extra[@]} -gt 0 && "${extra[0]}" =~ ^[A-Z_][A-Z0-9_]*= ]]; do
    case "${extra[0]}" in
      OVERLAY=*) configs+=",'${extra[0]#OVERLAY=}'" ;;
      DATASET=*) dataset=${extra[0]#DATASET=} ;;
      *) env+=("${extra[0]}") ;;
    esac
    extra=("${extra[@]:1}")
  done
  [[ -n "${STAGE_SECONDS:-}" ]] && extra+=(--time_limit "$STAGE_SECONDS")
  [[ -f "$runs/$name/checkpoint_last.pt" ]] && extra+=(--resume_from "$runs/$name/checkpoint_last.pt")
  env "${env[@]}" CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1 \
    python -m monai.bundle run training --config_file "[$configs]" --dataset_dir "$data/$dataset" \
    "${common[@]}" --output_dir "$runs/$name" "${extra[@]}" >>"$runs/$name/log.txt" 2>&1 &
done <"$spec"
wait
python docs/study/curves.py "$runs" --csv "$runs/curves.csv"
