#!/usr/bin/env bash
# The autoencoder training under compile reduce-overhead (CUDA graphs) with its adversarial loss on,
# on a host of 2 GPUs (docs/performance.md, section 8), on the generation heads (docs/generation.md):
#   1. side by side: on GPU 0 the isolated training steps of the training configs (4x; 4x, 8x and 16x
#      with adv_weight 0.01), eager and reduce-overhead, beside the planner's estimate (scripts.benchmark),
#      and the diffusion UNet on 16x latents; on GPU 1 the 4x default with adv_weight 0.01 from its
#      second epoch and validation after every epoch, under reduce-overhead and then eager;
#   2. the same reduce-overhead training data-parallel on both GPUs (multi_gpu_train_autoencoder.yaml).
#   OUT=results SECONDS_EACH=100 bash docs/study/autoencoder_graphs.sh
# Reads .data/generation.tar.xz. $OUT receives summary.md, isolated.json and logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
each=${SECONDS_EACH:-100} logs=/tmp/ag_logs runs=/tmp/ag_runs
rm -rf "$logs" "$runs"; mkdir -p "$logs" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
ae=(--dataset_dir /tmp/gen/train --val_dataset_dir /tmp/gen/val --use_mlflow False --max_epochs 1000 --deterministic False
    --epoch_length 300 --val_interval 1 --adv_weight 0.01 --adv_warmup_epochs 1)
run() {  # name gpu(s) args...: one process per GPU listed
  local name=$1 gpu=$2; shift 2
  local launch=(python3) configs="'configs/train_autoencoder.yaml'"
  if [[ "$gpu" == *,* ]]; then
    launch=(python3 -m torch.distributed.run --standalone --nproc_per_node=2)
    configs+=",'configs/multi_gpu_train_autoencoder.yaml'"
  fi
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( each + 150 )) "${launch[@]}" -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "$runs/$name" --time_limit "$each" "${ae[@]}" "$@" >>"$logs/$name.log" 2>&1
  echo "$name: exit $?" >>"$logs/exits.txt"
}
(CUDA_VISIBLE_DEVICES=0 timeout $(( 2 * each + 120 )) python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --factors '[]' --diffusion_factors 16 --reconstruction '[]' \
  --compile reduce-overhead --warmup 10 --steps 50 --training_patches '[[128,128,64]]' --training_batches 2 --training_configs \
  '[[["configs/train_autoencoder.yaml"], {}], [["configs/train_autoencoder.yaml"], {"adv_weight": 0.01}],
    [["configs/train_autoencoder.yaml", "configs/examples/factors_8x.yaml"], {"adv_weight": 0.01}],
    [["configs/train_autoencoder.yaml", "configs/examples/factors_16x.yaml"], {"adv_weight": 0.01}]]' \
  --output "$OUT/isolated.json" >"$logs/isolated.log" 2>&1; echo "isolated: exit $?" >>"$logs/exits.txt") &
(run ae4_adv_graphs 1 --compile reduce-overhead; run ae4_adv_eager 1) &
wait
each=$(( each * 3 / 4 )) run ae4_adv_graphs_ddp 0,1 --compile reduce-overhead
summarise "$logs"
grep -E "^(training|unet)|GiB|planned" "$logs/isolated.log" | tail -n 20 >>"$OUT/summary.md"
