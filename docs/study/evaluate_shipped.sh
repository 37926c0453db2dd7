#!/usr/bin/env bash
# The shipped diffusion models measured as docs/generation.md's table measures them (scripts.evaluate_generation,
# 8 samples per class, seed 0), one GPU each, beside a generation stage on the same host:
#   GPUS="2 3" FACTORS="4x 8x" OUT=$OUT bash docs/study/evaluate_shipped.sh
# Reads .data/init/shipped_<factor>.pt (the factor's models/model*.pt) and .data/init/ae_<factor>.pt, and
# waits until generation_stage.sh has installed the packages and unpacked the volumes. $OUT receives
# shipped_<factor>.tar.gz (generation.json, generation.md, the grids and the log).
set -uo pipefail
until [[ -f /tmp/eval/device.txt ]]; do sleep 5; done
export PYTHONPATH=$PWD/.data/site:$PWD PYTHONWARNINGS=ignore
gpus=(${GPUS:?}) factors=(${FACTORS:?})
for i in "${!factors[@]}"; do
  f=${factors[$i]} gpu=${gpus[$(( i % ${#gpus[@]} ))]}
  (
    rm -rf "/tmp/shipped_$f"
    CUDA_VISIBLE_DEVICES=$gpu python3 -m scripts.evaluate_generation --diffusion_ckpt ".data/init/shipped_$f.pt" \
      --autoencoder_ckpt ".data/init/ae_$f.pt" --train_dir /tmp/gen/train --val_dir /tmp/gen/val \
      --output_dir "/tmp/shipped_$f" --num_samples 8 --seed 0 >"/tmp/shipped_$f.log" 2>&1
    mv "/tmp/shipped_$f.log" "/tmp/shipped_$f/" && rm -rf "/tmp/shipped_$f/samples"
    tar czf "$OUT/shipped_$f.tar.gz" -C /tmp "shipped_$f"
  ) &
done
wait
