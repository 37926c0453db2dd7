#!/usr/bin/env bash
# Training throughput on a host of 4 GPUs (docs/performance.md, sections 10 and 11): the 4x
# autoencoder on the generation heads (patch 128x128x64, batch 2 per GPU) and the diffusion UNet on
# their latents (batch 16 per GPU), each on 1 GPU and on 4 with the multi-GPU overlays, for the same
# wall time. Three data paths side by side on one GPU each: the default loader, MONAI's
# ThreadDataLoader (the next batch prepared in a thread while the GPU works), and volumes cached on
# the GPU (the crop and collation run there). Then the isolated step of the same config.
#   OUT=results SECONDS_EACH=70 bash docs/study/scaling.sh
# $OUT receives one log per run and scaling.md, the epochs' steps per second and data wait.
set -uo pipefail
mkdir -p "${OUT:?set OUT to the folder for the results}"
site=$PWD/.data/site
if [[ ! -d $site/monai ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD PYTHONWARNINGS=ignore OMP_NUM_THREADS=8
mkdir -p /tmp/gen
[[ -d /tmp/gen/train ]] || tar xJf .data/generation.tar.xz -C /tmp/gen || exit 1
each=${SECONDS_EACH:-70}
ae="'configs/train_autoencoder.yaml'"
common=(--dataset_dir /tmp/gen/train --use_mlflow False --deterministic False --val_interval 1000 --time_limit "$each")
autoencoder=(--epoch_length 300 --patch_size "[128,128,64]" --batch_size 2)
diffusion=(--epoch_length 200 --autoencoder_ckpt models/model_autoencoder.pt --condition_key class)
gpu_cache='$@preprocessing_transforms + [monai.transforms.EnsureTyped("image", device=@device, track_meta=False)] + @train#crop_transforms'
one() {  # name gpu configs args...
  local name=$1 gpu=$2 configs=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( each + 150 )) python3 -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "/tmp/scaling/$name" "${common[@]}" "$@" >"$OUT/$name.log" 2>&1
}
four() {  # name configs args...
  local name=$1 configs=$2; shift 2
  CUDA_VISIBLE_DEVICES=0,1,2,3 timeout $(( each + 180 )) python3 -m torch.distributed.run --standalone --nproc_per_node=4 \
    -m monai.bundle run training --config_file "[$configs]" --output_dir "/tmp/scaling/$name" "${common[@]}" "$@" >"$OUT/$name.log" 2>&1
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 >"$OUT/device.txt"
# 1 GPU each, side by side
one ae_1gpu 0 "$ae" "${autoencoder[@]}" &
one ae_1gpu_thread 1 "$ae" "${autoencoder[@]}" --train#dataloader#_target_ ThreadDataLoader &
one ae_1gpu_gpucache 2 "$ae" "${autoencoder[@]}" --train#preprocessing#transforms "$gpu_cache" &
one diffusion_1gpu 3 "$ae,'configs/train_diffusion.yaml'" "${diffusion[@]}" &
wait
four ae_4gpu "$ae,'configs/multi_gpu_train_autoencoder.yaml'" "${autoencoder[@]}"
four diffusion_4gpu "$ae,'configs/train_diffusion.yaml','configs/multi_gpu_train_diffusion.yaml'" "${diffusion[@]}"
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True  # as training with deterministic false
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --factors '[]' --diffusion_factors --reconstruction '[]' --compile \
  --warmup 10 --steps 50 --output "$OUT/isolated.json" \
  --training_configs '[[["configs/train_autoencoder.yaml"], {}]]' --training_patches '[[128,128,64]]' --training_batches 2 \
  >"$OUT/isolated.log" 2>&1
for log in "$OUT"/*.log; do
  echo "## $(basename "$log" .log)"
  grep -E "Epoch\[[0-9]+\] Metrics|Error|error" "$log" | sed 's/.*Metrics -- //' | tail -n 12
done >"$OUT/scaling.md"
cat "$OUT/scaling.md"
