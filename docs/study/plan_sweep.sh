#!/usr/bin/env bash
# Measure the bundle's autoencoder training step (peak memory, step time) over a grid of patches and
# batches, for the 4x default and the 8x and 16x overlays in both layouts, and the losses and settings
# that change what a step keeps: the data the memory planner (scripts/plan.py) is fitted to
# (docs/study/plan_fit.py) and checked on. One GPU; PYTHONPATH holding MONAI.
#   OUT=results bash docs/study/plan_sweep.sh
# docs/measurements/training_steps_h100_2026-11-27.jsonl holds the rows of its first run, made with
# an earlier form of this script (the same grid, measured by scripts/plan.py before the benchmark
# took the measuring over), plus deterministic kernels at 4x and 8x strided again, over three calls.
set -uo pipefail
base='"configs/train_autoencoder.yaml"' x8='"configs/examples/factors_8x.yaml"' x16='"configs/examples/factors_16x.yaml"'
configs="[[[$base], {}], [[$base], {\"layout\": \"strided\"}], [[$base, $x8], {}], [[$base, $x8], {\"layout\": \"strided\"}],
 [[$base, $x16], {}], [[$base, $x16], {\"layout\": \"strided\"}]]"
variants="[[[$base], {\"adv_weight\": 0.01}], [[$base], {\"spectral_weight\": 2.0}], [[$base], {\"use_gradient_checkpointing\": true}]]"
only_training=(--no_stock --factors '[]' --diffusion_factors --reconstruction '[]' --compile --warmup 2 --steps 4)
python3 -m scripts.benchmark "${only_training[@]}" --training_configs "$configs" \
  --training_patches '[[64,64,64],[128,128,64],[128,128,128],[192,192,96],[256,256,128]]' --training_batches 1 2 4 \
  --output "${OUT:?set OUT}/training_steps.json"
python3 -m scripts.benchmark "${only_training[@]}" --training_configs "$variants" \
  --training_patches '[[128,128,64],[256,256,128]]' --training_batches 1 2 --output "$OUT/training_variants.json"
