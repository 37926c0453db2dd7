#!/usr/bin/env bash
# A learning curve of the samples: each snapshot a generation stage kept (SNAPSHOTS=1) measured as
# docs/generation.md's table measures the shipped models (scripts.evaluate_generation), PARALLEL at a
# time on one GPU, after generation_stage.sh has installed the packages and unpacked the volumes.
#   RUN=g23_4x_mean AE=.data/init/ae_4x.pt EPOCHS="2 4 8" NUM_SAMPLES=16 SEED=0 OUT=$OUT bash docs/study/evaluate_snapshots.sh
# EPOCHS names the snapshots (model_<epochs>.pt in .data/gen_runs/RUN/snapshots; "last": the one at the time limit); EXTRA="name=path ..."
# adds other diffusion models (e.g. the shipped one) to the same measure. $OUT receives
# snapshots_RUN.tar.gz: per model its generation.json, generation.md and log, without the samples.
set -uo pipefail
until [[ -d /tmp/gen/val && -d .data/site/monai ]]; do sleep 5; done
export PYTHONPATH=$PWD/.data/site:$PWD PYTHONWARNINGS=ignore
snaps=.data/gen_runs/${RUN:?}/snapshots results=/tmp/snapshots_$RUN
rm -rf "$results"; mkdir -p "$results"
models=()
for e in ${EPOCHS:?}; do models+=("e$e=$snaps/model_$e.pt"); done
models+=(${EXTRA:-})
for i in "${!models[@]}"; do
  name=${models[$i]%%=*} ckpt=${models[$i]#*=}
  (
    python3 -m scripts.evaluate_generation --diffusion_ckpt "$ckpt" --autoencoder_ckpt "${AE:?}" \
      --train_dir /tmp/gen/train --val_dir /tmp/gen/val --output_dir "$results/$name" \
      --num_samples "${NUM_SAMPLES:-8}" --seed "${SEED:-0}" >"$results/$name.log" 2>&1
    rm -rf "$results/$name/samples" "$results/$name"/grid_*.png
  ) &
  (( (i + 1) % ${PARALLEL:-4} == 0 )) && wait
done
wait
for m in "${models[@]}"; do echo "## ${m%%=*}"; cat "$results/${m%%=*}/generation.md" 2>/dev/null || tail -n 3 "$results/${m%%=*}.log"; done \
  | tee "$results/summary.md"
tar czf "$OUT/snapshots_$RUN.tar.gz" -C /tmp "snapshots_$RUN"
