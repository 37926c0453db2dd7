#!/usr/bin/env bash
# Data-parallel scaling as the bundle now trains (docs/performance.md, section 5): one GPU and four GPUs
# of one host, each run with the host to itself, so that the one-GPU rate is not slowed by runs beside
# it (scaling.sh ran its one-GPU runs four side by side). The 4x autoencoder default on the generation
# heads (patch 128x128x64, batch 2 per GPU, cache memory, no validation in the window) under CUDA graphs
# (the default on a GPU) and eager, and under CUDA graphs with the volumes cached on the GPU (cache gpu);
# the diffusion UNet on the 4x latents (batch 8 per GPU) under CUDA graphs. All of it takes more than one
# call of 10 minutes: name the runs of each call in RUNS.
#   OUT=results bash docs/study/scaling_graphs.sh
#   OUT=results RUNS="diffusion_graphs_1gpu diffusion_graphs_4gpu" bash docs/study/scaling_graphs.sh   (some runs only)
# The compiled diffusion UNet on 4x latents took more than 60 s to compile and record on an H200: give it 150.
# Reads .data/generation.tar.xz and .data/init/ae_4x.pt. $OUT receives summary.md and logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
logs=/tmp/sg_logs runs=/tmp/sg_runs
rm -rf "$logs" "$runs"; mkdir -p "$logs" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
common=(--dataset_dir /tmp/gen/train --use_mlflow False --deterministic False --val_interval 1000 --max_epochs 1000)
ae=("'configs/train_autoencoder.yaml'" --epoch_length 300 --patch_size "[128,128,64]" --batch_size 2)
diffusion=("'configs/train_autoencoder.yaml','configs/train_diffusion.yaml'" --epoch_length 100 --batch_size 8
           --autoencoder_ckpt .data/init/ae_4x.pt --condition_key class)
run() {  # name gpus seconds configs args...: one process per GPU, the multi-GPU overlay for more than one
  local name=$1 gpus=$2 seconds=$3 configs=$4; shift 4
  [[ -z "${RUNS:-}" || " $RUNS " == *" $name "* ]] || return 0
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( gpus - 1 ))) timeout $(( seconds + 60 )) $(launcher "$gpus") -m monai.bundle run training \
    --config_file "[$(with_overlay "$gpus" "$configs")]" --output_dir "$runs/$name" --time_limit "$seconds" "${common[@]}" "$@" >"$logs/$name.log" 2>&1
  echo "$name: exit $?" >>"$logs/exits.txt"
}
run ae_graphs_1gpu 1 "${AE_SECONDS:-90}" "${ae[@]}"
run ae_graphs_4gpu 4 "${AE_SECONDS:-90}" "${ae[@]}"
run diffusion_graphs_1gpu 1 "${DIFFUSION_SECONDS:-150}" "${diffusion[@]}"
run diffusion_graphs_4gpu 4 "${DIFFUSION_SECONDS:-150}" "${diffusion[@]}"
run ae_graphs_gpucache_1gpu 1 "${AE_SECONDS:-90}" "${ae[@]}" --cache gpu
run ae_graphs_gpucache_4gpu 4 "${AE_SECONDS:-90}" "${ae[@]}" --cache gpu
run ae_eager_1gpu 1 "${EAGER_SECONDS:-45}" "${ae[@]}" --compile false
run ae_eager_4gpu 4 "${EAGER_SECONDS:-45}" "${ae[@]}" --compile false
summarise "$logs"
