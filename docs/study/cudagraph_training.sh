#!/usr/bin/env bash
# Whole trainings under compile reduce-overhead (CUDA graphs, each optimizer step marked by
# scripts.engines.CUDAGraphSteps) on a host of 4 GPUs (docs/performance.md, section 8), on the
# generation heads (docs/generation.md):
#   1. side by side for the same wall time: the 8x diffusion model (UNet 96/96/96, batch 32) eager and
#      under reduce-overhead on one GPU each, and under reduce-overhead data-parallel on two (16 each);
#   2. the reduce-overhead run resumed from its checkpoint; the 4x autoencoder (cache gpu) under
#      reduce-overhead; the benchmark's isolated steps eager and under reduce-overhead; and gradient
#      accumulation: 20 float32 steps of batch 32 and of 2 x 16, eager and reduce-overhead, whose weights
#      must agree as closely as the eager runs agree with each other.
#   OUT=results SECONDS_EACH=150 bash docs/study/cudagraph_training.sh
# Reads .data/generation.tar.xz and .data/init/ae_8x.pt. $OUT receives summary.md, accumulation.json,
# isolated.json and logs.tar.gz.
set -uo pipefail
source docs/study/gpu_host.sh
each=${SECONDS_EACH:-150} logs=/tmp/cg_logs runs=/tmp/cg_runs
mkdir -p "$logs" "$runs"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee "$logs/device.txt"
common=(--dataset_dir /tmp/gen/train --use_mlflow False --max_epochs 1000)
d8="'configs/train_autoencoder.yaml','configs/examples/factors_8x.yaml','configs/train_diffusion.yaml'"
wide=(--autoencoder_ckpt .data/init/ae_8x.pt --condition_key class --diffusion_channels "[96,96,96]" --diffusion_norm_num_groups 8)
run() {  # name gpu(s) configs args...: one process per GPU listed
  local name=$1 gpu=$2 configs=$3; shift 3
  local launch=(python3)
  [[ "$gpu" == *,* ]] && launch=(python3 -m torch.distributed.run --standalone --nproc_per_node=2) \
    && configs+=",'configs/multi_gpu_train_diffusion.yaml'"
  CUDA_VISIBLE_DEVICES=$gpu timeout $(( each + 200 )) "${launch[@]}" -m monai.bundle run training --config_file "[$configs]" \
    --output_dir "$runs/$name" "${common[@]}" "$@" >>"$logs/$name.log" 2>&1
  echo "$name: exit $?" >>"$logs/exits.txt"
}
timed=(--deterministic False --epoch_length 250 --time_limit "$each")
run d8_eager 0 "$d8" "${wide[@]}" "${timed[@]}" --batch_size 32 &
run d8_graphs 1 "$d8" "${wide[@]}" "${timed[@]}" --batch_size 32 --compile reduce-overhead &
run d8_graphs_ddp 2,3 "$d8" "${wide[@]}" "${timed[@]}" --batch_size 16 --compile reduce-overhead &
wait

each=60 run d8_graphs 0 "$d8" "${wide[@]}" --deterministic False --epoch_length 250 --time_limit 60 --batch_size 32 \
  --compile reduce-overhead --resume_from "$runs/d8_graphs/checkpoint_last.pt" &
run ae4_graphs 1 "'configs/train_autoencoder.yaml'" --deterministic False --epoch_length 300 --val_interval 1000 \
  --time_limit 120 --cache gpu --compile reduce-overhead &
(CUDA_VISIBLE_DEVICES=2 timeout $(( each + 150 )) python3 -c "import sys, torch; torch.backends.cudnn.benchmark = True
from scripts.benchmark import main; main(sys.argv[1:])" --no_stock --layouts space_to_depth --factors '[[2,2],[4,2],[4,4]]' \
  --diffusion_factors 8 16 --reconstruction '[]' --compile reduce-overhead --warmup 10 --steps 50 \
  --output "$OUT/isolated.json" >"$logs/isolated.log" 2>&1) &
(
  steps=(--deterministic True --mixed_precision null --epoch_length 20 --max_epochs 1 --seed 3)
  each=60 run acc_eager_b32 3 "$d8" "${wide[@]}" "${steps[@]}" --batch_size 32
  each=60 run acc_eager_2x16 3 "$d8" "${wide[@]}" "${steps[@]}" --batch_size 16 --gradient_accumulation_steps 2
  each=60 run acc_graphs_2x16 3 "$d8" "${wide[@]}" "${steps[@]}" --batch_size 16 --gradient_accumulation_steps 2 --compile reduce-overhead
  each=60 run acc_graphs_b32 3 "$d8" "${wide[@]}" "${steps[@]}" --batch_size 32 --compile reduce-overhead
) &
wait

python3 - "$runs" "$OUT/accumulation.json" <<'PY'
import itertools, json, sys, torch
runs, out = sys.argv[1:]
names = ["acc_eager_b32", "acc_eager_2x16", "acc_graphs_2x16", "acc_graphs_b32"]
weights = {}
for n in names:
    try:
        weights[n] = torch.load(f"{runs}/{n}/checkpoint_last.pt", map_location="cpu", weights_only=True)["diffusion"]
    except Exception as e:
        print(n, "no checkpoint:", e)
start = torch.load(f"{runs}/acc_eager_b32/checkpoint_last.pt", map_location="cpu", weights_only=True) if weights else None
rows = []
for a, b in itertools.combinations(weights, 2):
    diff = max((weights[a][k].float() - weights[b][k].float()).abs().max().item() for k in weights[a])
    rel = (sum((weights[a][k].float() - weights[b][k].float()).pow(2).sum() for k in weights[a])
           / sum(weights[a][k].float().pow(2).sum() for k in weights[a])).sqrt().item()
    rows.append({"a": a, "b": b, "max_abs": diff, "relative_l2": rel})
    print(json.dumps(rows[-1]))
json.dump(rows, open(out, "w"), indent=1)
PY

summarise "$logs"
