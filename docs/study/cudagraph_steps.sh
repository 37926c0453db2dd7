#!/usr/bin/env bash
# The autoencoder's whole training and the benchmark's isolated steps, eager and under compile
# reduce-overhead (CUDA graphs), on two GPUs of one host (docs/performance.md, section 8). On the
# first GPU the 4x default, on the second the 8x overlay, each trained on the generation heads
# (docs/generation.md) with cache gpu, patch 128x128x64, batch 2, for the same wall time eager and
# compiled; then the benchmark's rows (reference networks, 256x256x64, batch 1): the 4x autoencoder
# on the first GPU, the UNet at 8x and 16x and the 8x and 16x autoencoders on the second.
#   GPUS="2 3" SECONDS_EACH=100 OUT=results bash docs/study/cudagraph_steps.sh
# $OUT receives steps_summary.md, bench_*.json and steps_logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
read -r first second <<<"${GPUS:-0 1}"
each=${SECONDS_EACH:-100} logs=/tmp/steps_logs
mkdir -p "$logs"
train() {  # name gpu overlay|- args...
  local name=$1 gpu=$2 overlay=$3; shift 3
  local configs="'configs/train_autoencoder.yaml'"
  [[ "$overlay" != "-" ]] && configs+=",'$overlay'"
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( each + 120 )) python3 -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "/tmp/steps_runs/$name" --dataset_dir /tmp/gen/train --use_mlflow False --deterministic False \
    --epoch_length 300 --val_interval 1000 --time_limit "$each" --cache gpu "$@" >"$logs/$name.log" 2>&1
}
bench() {  # name gpu seconds args...
  local name=$1 gpu=$2 seconds=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout "$seconds" python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --layouts space_to_depth --reconstruction '[]' \
    --compile reduce-overhead --warmup 10 --steps 50 --output "$OUT/$name.json" "$@" >"$logs/$name.log" 2>&1
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 >"$logs/device.txt"
(
  train ae4_eager "$first" -
  train ae4_graphs "$first" - --compile reduce-overhead
  bench bench_ae4 "$first" 150 --factors '[[2,2]]' --diffusion_factors
) &
(
  train ae8_eager "$second" configs/examples/factors_8x.yaml
  train ae8_graphs "$second" configs/examples/factors_8x.yaml --compile reduce-overhead
  bench bench_unet "$second" 120 --factors '[]' --diffusion_factors 8 16
  bench bench_ae8_16 "$second" 120 --factors '[[4,2],[4,4]]' --diffusion_factors
) &
wait
for log in "$logs"/*.log; do
  echo "## $(basename "$log" .log)"
  grep -E "Epoch\[[0-9]+\] Metrics|Error|error|torch.compile|space_to_depth|UNet on" "$log" | grep -v -i warn | tail -n 8
done >"$OUT/steps_summary.md"
cat "$logs/device.txt" >>"$OUT/steps_summary.md"
tar czf "$OUT/steps_logs.tar.gz" -C "$logs" .
