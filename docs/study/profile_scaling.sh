#!/usr/bin/env bash
# Where a step's time goes when the same training runs on one GPU and data-parallel on four
# (docs/performance.md, section 5: the 4x autoencoder eager made 41.1 steps per second alone and 29.8
# per process on four; the diffusion UNet under CUDA graphs 58.6 and 48.7). Each run, with the host to
# itself, profiles 100 steps after a warm-up (profile_training.py; every process of a data-parallel run
# profiles itself), the settings of scaling_graphs.sh; ae_eager_4gpu_no_broadcast without DistributedDataParallel's
# broadcast of the module's buffers at every forward (the autoencoder's one buffer is its constant cosine basis).
#   OUT=results RUNS="ae_eager_1gpu ae_eager_4gpu" bash docs/study/profile_scaling.sh
# Reads .data/generation.tar.xz and .data/init/ae_4x.pt. $OUT receives summary.md (each process's
# profile.json) and profiles.tar.gz (the operator tables).
set -uo pipefail
source docs/study/gpu_host.sh
logs=/tmp/ps_logs prof=/tmp/ps_prof
rm -rf "$logs" "$prof"; mkdir -p "$logs" "$prof"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
common='"dataset_dir": "/tmp/gen/train", "deterministic": false, "val_interval": 1000'
ae="'configs/train_autoencoder.yaml'"
diffusion="'configs/train_autoencoder.yaml','configs/train_diffusion.yaml'"
profile() {  # name gpus warmup configs overrides_json
  local name=$1 gpus=$2 warmup=$3 configs=$4 overrides=$5
  [[ -z "${RUNS:-}" || " $RUNS " == *" $name "* ]] || return 0
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $(( gpus - 1 ))) timeout "${RUN_SECONDS:-240}" $(launcher "$gpus") docs/study/profile_training.py \
    "$prof/$name" "[$(with_overlay "$gpus" "$configs")]" "{$common, \"output_dir\": \"/tmp/ps_runs/$name\", $overrides}" "$warmup" 100 >"$logs/$name.log" 2>&1
  echo "$name: exit $?" >>"$logs/exits.txt"
}
profile ae_eager_1gpu 1 100 "$ae" '"patch_size": [128, 128, 64], "batch_size": 2, "compile": false'
profile ae_eager_4gpu 4 100 "$ae" '"patch_size": [128, 128, 64], "batch_size": 2, "compile": false'
profile ae_eager_4gpu_no_broadcast 4 100 "$ae" '"patch_size": [128, 128, 64], "batch_size": 2, "compile": false, "ddp_args": "$dict(device_ids=[@device.index], broadcast_buffers=False)"'
profile diffusion_graphs_1gpu 1 300 "$diffusion" '"batch_size": 8, "autoencoder_ckpt": ".data/init/ae_4x.pt", "condition_key": "class"'
profile diffusion_graphs_4gpu 4 300 "$diffusion" '"batch_size": 8, "autoencoder_ckpt": ".data/init/ae_4x.pt", "condition_key": "class"'
for f in $(find "$prof" -name profile.json | sort); do echo "## ${f#$prof/}"; tr -d '\n' <"$f"; echo; done >"$OUT/summary.md"
cat "$logs/exits.txt" "$logs/device.txt" >>"$OUT/summary.md"
for log in "$logs"/*.log; do echo "## $log"; grep -E "Error|Traceback" "$log" | tail -n 5; done >>"$OUT/summary.md"
cat "$OUT/summary.md"
tar czf "$OUT/profiles.tar.gz" -C "$prof" . -C "$logs" .
