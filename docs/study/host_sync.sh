#!/usr/bin/env bash
# The autoencoder training's host synchronisation per step, measured (docs/performance.md, section 10):
# the 4x default under compile reduce-overhead (cache gpu, patch 128x128x64, batch 2, the generation
# heads) with the trainer of the bundle's previous version ($OLD: its scripts/ and configs/, a tar from
# `git archive`), which read every step's losses back to the host, against this version's, which reads
# nothing back (fused Adam skips a non-finite step on the device; the check reads the values one
# iteration later). Side by side on two GPUs for the same wall time:
#   1. both without MLflow;
#   2. both with MLflow's default store (the previous version logged every step, this one every 50),
#      where the host has MLflow (skipped, with a line saying so, where it has not);
#   3. the isolated step of the same config, eager and reduce-overhead (scripts.benchmark), beside
#      the 8x diffusion training under reduce-overhead, which sums its loss on the device now.
#   OUT=results OLD=.data/previous.tar SECONDS_EACH=150 bash docs/study/host_sync.sh
set -uo pipefail
source docs/study/gpu_host.sh
each=${SECONDS_EACH:-80} logs=/tmp/hs_logs runs=/tmp/hs_runs old=/tmp/hs_previous
rm -rf "$logs" "$runs"; mkdir -p "$logs" "$runs" "$old"
tar xf "${OLD:?set OLD to a tar of the previous version: scripts/ and configs/}" -C "$old" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
ae=(--dataset_dir /tmp/gen/train --max_epochs 1000 --deterministic False --epoch_length 300 --val_interval 1000
    --cache gpu --compile reduce-overhead)
run() {  # name gpu root mlflow args...: one training in the bundle at root
  local name=$1 gpu=$2 root=$3 mlflow=$4; shift 4
  (cd "$root" && CUDA_VISIBLE_DEVICES=$gpu PYTHONPATH=$site:$root timeout $(( each + 200 )) python3 -m monai.bundle run training \
    --output_dir "$runs/$name" --use_mlflow "$mlflow" --tracking_uri "sqlite:///$runs/$name.db" --time_limit "$each" "$@" \
    >>"$logs/$name.log" 2>&1)
  echo "$name: exit $?" >>"$logs/exits.txt"
}
cfg=(--config_file configs/train_autoencoder.yaml)
run previous_no_mlflow 0 "$old" False "${cfg[@]}" "${ae[@]}" &
run this_no_mlflow 1 "$PWD" False "${cfg[@]}" "${ae[@]}" &
wait
if python3 -c "import mlflow" 2>/dev/null; then
  run previous_mlflow 0 "$old" True "${cfg[@]}" "${ae[@]}" &
  run this_mlflow 1 "$PWD" True "${cfg[@]}" "${ae[@]}" &
  wait
else
  echo "no MLflow on this host: phase 2 skipped" | tee -a "$logs/exits.txt"
fi
(CUDA_VISIBLE_DEVICES=0 timeout $(( each + 150 )) python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --layouts space_to_depth --factors '[[2,2]]' \
  --diffusion_factors --reconstruction '[]' --compile reduce-overhead --warmup 10 --steps 50 \
  --training_configs '[[["configs/train_autoencoder.yaml"], {}]]' --training_patches '[[128,128,64]]' --training_batches 2 \
  --output "$OUT/isolated.json" >"$logs/isolated.log" 2>&1) &
each=60 run diffusion_8x 1 "$PWD" False \
  --config_file "['configs/train_autoencoder.yaml','configs/examples/factors_8x.yaml','configs/train_diffusion.yaml']" \
  --dataset_dir /tmp/gen/train --max_epochs 1000 --deterministic False --epoch_length 250 --batch_size 32 \
  --autoencoder_ckpt .data/init/ae_8x.pt --condition_key class --diffusion_channels "[96,96,96]" --diffusion_norm_num_groups 8 &
wait
summarise "$logs"
