#!/usr/bin/env bash
# The 4x autoencoder training as it ships, on a GPU, against its isolated step (docs/performance.md,
# section 10): the default config (deterministic cuDNN kernels, cache memory, compile reduce-overhead,
# no adversarial loss) on the generation heads, patch 128x128x64, batch 2, without MLflow (not on the
# GPU host); then the same config's training step alone (scripts.benchmark), with the same kernels.
#   OUT=results SECONDS_EACH=120 bash docs/study/default_training.sh
set -uo pipefail
source docs/study/gpu_host.sh
each=${SECONDS_EACH:-120} logs=/tmp/dt_logs runs=/tmp/dt_runs
rm -rf "$logs" "$runs"; mkdir -p "$logs" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
timeout $(( each + 120 )) python3 -m monai.bundle run training --config_file configs/train_autoencoder.yaml \
  --dataset_dir /tmp/gen/train --output_dir "$runs/default" --use_mlflow False --max_epochs 1000 \
  --epoch_length 300 --val_interval 1000 --time_limit "$each" >"$logs/default.log" 2>&1
echo "default: exit $?" >>"$logs/exits.txt"
timeout 240 python3 -c "import sys, torch; torch.backends.cudnn.benchmark = False; torch.backends.cudnn.deterministic = True
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --layouts space_to_depth --factors '[]' \
  --diffusion_factors --reconstruction '[]' --compile reduce-overhead --warmup 10 --steps 50 \
  --training_configs '[[["configs/train_autoencoder.yaml"], {}]]' --training_patches '[[128,128,64]]' --training_batches 2 \
  --output "$OUT/isolated.json" >"$logs/isolated.log" 2>&1
echo "isolated: exit $?" >>"$logs/exits.txt"
tail -n 6 "$logs/isolated.log"
summarise "$logs"
