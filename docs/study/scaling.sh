#!/usr/bin/env bash
# Training throughput on a host of 4 GPUs (docs/performance.md, sections 5 and 10): the 4x
# autoencoder on the generation heads (patch 128x128x64, batch 2 per GPU) and the diffusion UNet on
# their latents (batch 8 per GPU: 36 latents give four processes 9 each), each on 1 GPU and on 4 with
# the multi-GPU overlays, for the same wall time. The data paths side by side on one GPU each: the
# default loader, MONAI's ThreadDataLoader (the next batch prepared in a thread while the GPU works),
# volumes cached on the GPU (cache gpu: the crop and collation run there), and both. Then the
# isolated step of the same config.
#   OUT=results SECONDS_EACH=50 bash docs/study/scaling.sh
# $OUT receives scaling.md (the epochs' steps per second and data wait), isolated.json and logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
each=${SECONDS_EACH:-70} logs=/tmp/scaling_logs
mkdir -p "$logs"
ae="'configs/train_autoencoder.yaml'"
common=(--dataset_dir /tmp/gen/train --use_mlflow False --deterministic False --val_interval 1000 --time_limit "$each")
autoencoder=(--epoch_length 300 --patch_size "[128,128,64]" --batch_size 2)
diffusion=(--epoch_length 200 --autoencoder_ckpt models/model_autoencoder.pt --condition_key class --batch_size 8)
one() {  # name gpu configs args...
  local name=$1 gpu=$2 configs=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( each + 150 )) python3 -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "/tmp/scaling/$name" "${common[@]}" "$@" >"$logs/$name.log" 2>&1
}
four() {  # name configs args...
  local name=$1 configs=$2; shift 2
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout $(( each + 180 )) python3 -m torch.distributed.run --standalone --nproc_per_node=4 \
    -m monai.bundle run training --config_file "[$configs]" --output_dir "/tmp/scaling/$name" "${common[@]}" "$@" >"$logs/$name.log" 2>&1
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 >"$logs/device.txt"
# 1 GPU each, side by side
one ae_1gpu 0 "$ae" "${autoencoder[@]}" &
one ae_1gpu_thread 1 "$ae" "${autoencoder[@]}" --train#dataloader#_target_ ThreadDataLoader &
one ae_1gpu_gpucache 2 "$ae" "${autoencoder[@]}" --cache gpu &
one ae_1gpu_gpucache_thread 3 "$ae" "${autoencoder[@]}" --cache gpu --train#dataloader#_target_ ThreadDataLoader &
wait
one diffusion_1gpu 0 "$ae,'configs/train_diffusion.yaml'" "${diffusion[@]}"
four ae_4gpu "$ae,'configs/multi_gpu_train_autoencoder.yaml'" "${autoencoder[@]}"
four ae_4gpu_gpucache "$ae,'configs/multi_gpu_train_autoencoder.yaml'" "${autoencoder[@]}" --cache gpu
four diffusion_4gpu "$ae,'configs/train_diffusion.yaml','configs/multi_gpu_train_diffusion.yaml'" "${diffusion[@]}"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True  # as training with deterministic false
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --factors '[]' --diffusion_factors --reconstruction '[]' --compile \
  --warmup 10 --steps 50 --output "$OUT/isolated.json" \
  --training_configs '[[["configs/train_autoencoder.yaml"], {}]]' --training_patches '[[128,128,64]]' --training_batches 2 \
  >"$logs/isolated.log" 2>&1
for log in "$logs"/*.log; do
  echo "## $(basename "$log" .log)"
  grep -E "Epoch\[[0-9]+\] Metrics|Error|error" "$log" | sed 's/.*Metrics -- //' | tail -n 12
done >"$OUT/scaling.md"
cat "$OUT/scaling.md"
tar czf "$OUT/logs.tar.gz" -C "$logs" .
