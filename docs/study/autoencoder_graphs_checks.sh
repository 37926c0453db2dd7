#!/usr/bin/env bash
# The autoencoder training under compile reduce-overhead, the paths a default must take (docs/performance.md,
# section 8), on one GPU with the generation heads (docs/generation.md), adversarial loss from the second epoch:
#   1. gradient accumulation (2 x batch 1) for 2 epochs of 100 iterations, then resumed for a third epoch;
#   2. beside it on a second GPU where there is one, the 8x overlay for the same wall time, reduce-overhead.
#   OUT=results bash docs/study/autoencoder_graphs_checks.sh
# Reads .data/generation.tar.xz. $OUT receives summary.md and logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
logs=/tmp/agc_logs runs=/tmp/agc_runs
rm -rf "$logs" "$runs"; mkdir -p "$logs" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
ae=(--dataset_dir /tmp/gen/train --use_mlflow False --deterministic False --val_interval 1000 --adv_weight 0.01
    --adv_warmup_epochs 1 --compile reduce-overhead --epoch_length 100)
run() {  # name gpu configs args...
  local name=$1 gpu=$2 configs=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout 200 python3 -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "$runs/$name" "${ae[@]}" "$@" >>"$logs/$name.log" 2>&1
  echo "$name: exit $?" >>"$logs/exits.txt"
}
(run accumulate 0 "'configs/train_autoencoder.yaml'" --batch_size 1 --gradient_accumulation_steps 2 --max_epochs 2
 run accumulate 0 "'configs/train_autoencoder.yaml'" --batch_size 1 --gradient_accumulation_steps 2 --max_epochs 3 \
   --resume_from "$runs/accumulate/checkpoint_last.pt") &
if (( $(nvidia-smi -L | wc -l) > 1 )); then
  run ae8 1 "'configs/train_autoencoder.yaml','configs/examples/factors_8x.yaml'" --max_epochs 1000 --time_limit 100 &
fi
wait
summarise "$logs"
