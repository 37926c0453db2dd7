#!/usr/bin/env bash
# One stage of the generation study on a GPU host (docs/generation.md): the diffusion model trained on
# the latents of the 4x, 8x and 16x autoencoders side by side, one GPU each, for the same wall time,
# then each evaluated (scripts.evaluate_generation) and timed (generation_speed.py). $OUT receives
# results.tar.gz (tables, grids, logs) and models.tar (each model.pt in half precision) in parts of 15 MB.
#   OUT=results STAGE_SECONDS=300 CALL_SECONDS=540 KEEP="run1 run2" bash docs/study/generation_stage.sh SPEC_FILE
# KEEP names the runs whose weights come back (default: all), whole models up to 60 MB in all. CALL_SECONDS is the time the whole call
# may take (default 540): the evaluation and the timing are cut short so that the weights and the logs
# are packed within it. NUM_SAMPLES (default 8) and SEED (default 0) are the evaluation's; from 16 samples
# per class on, distance_draw.py also scores each set of 8 (draw.json) and classifier_test.py the T1 samples
# (classifier.md). SPEED=0 skips the timing. SNAPSHOTS=1 keeps a copy of each model.pt a run writes (one per
# epoch_length steps, model_<epochs>.pt; the one at the time limit model_last.pt) in the run's snapshots/
# folder, for evaluate_snapshots.sh.
# SPEC_FILE: one run per line, "NAME GPU AUTOENCODER_CKPT OVERLAY|- [OVERRIDES ...]" (# comments).
# The volumes are .data/generation.tar.xz (a tar of train/ and val/ from prepare_generation.py).
# The runs live in .data/gen_runs, which a warm host keeps between calls: a run whose folder holds a
# checkpoint_last.pt resumes from it (optimizer, moving average and step count), so a long training
# spans several calls. EVAL=0 trains only (no evaluation, no timing): the first calls of such a series.
# Send the files it reads (.data/generation.tar.xz, the checkpoints the spec names), not the folder .data:
# a folder sent again replaces the one on the host, and with it the runs to resume (stage 12 lost a call so).
set -uo pipefail
deadline=$(( SECONDS + ${CALL_SECONDS:-540} - 45 ))  # 45 s to pack what there is
left() { echo $(( deadline - SECONDS > 1 ? deadline - SECONDS : 1 )); }
mkdir -p "${OUT:?set OUT to the folder for the results}"
spec=$1
site=$PWD/.data/site runs=$PWD/.data/gen_runs
if [[ ! -d $site/monai ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD PYTHONWARNINGS=ignore
rm -rf /tmp/eval; mkdir -p /tmp/gen "$runs" /tmp/eval
[[ -d /tmp/gen/val ]] || tar xJf .data/generation.tar.xz -C /tmp/gen || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | head -1 | tee /tmp/eval/device.txt

stage() {  # name gpu autoencoder overlay overrides...
  local name=$1 gpu=$2 ae=$3 overlay=$4; shift 4
  local configs="'configs/train_autoencoder.yaml',"
  [[ "$overlay" != "-" ]] && configs+="'$overlay',"
  configs+="'configs/train_diffusion.yaml'"
  local launch="python3"  # GPU "0,1": data-parallel over those GPUs with the multi-GPU overlay
  if [[ "$gpu" == *,* ]]; then
    configs+=",'configs/multi_gpu_train_diffusion.yaml'"
    launch="python3 -m torch.distributed.run --standalone --nproc_per_node=$(( $(tr -cd , <<<"$gpu" | wc -c) + 1 ))"
  fi
  local resume=()
  [[ -f "$runs/$name/checkpoint_last.pt" ]] && resume=(--resume_from "$runs/$name/checkpoint_last.pt")
  export CUDA_VISIBLE_DEVICES=$gpu OMP_NUM_THREADS=12
  if [[ "${SNAPSHOTS:-0}" == 1 ]]; then  # keep every model.pt the run writes, as snapshots/model_<epochs done>.pt: a learning curve
    ( mkdir -p "$runs/$name/snapshots"; seen=""
      while sleep 2; do
        now=$(stat -c %Y "$runs/$name/model.pt" 2>/dev/null) || continue
        [[ "$now" == "$seen" ]] && continue
        sleep 1; seen=$now
        snap="$runs/$name/snapshots/model_$(grep -c 'Epoch\[[0-9]*\] Complete' "$runs/$name.log").pt"
        [[ -e "$snap" ]] && snap="$runs/$name/snapshots/model_last.pt"  # the save at the time limit, within an epoch
        cp "$runs/$name/model.pt" "$snap"
      done ) &
    local watcher=$!
  fi
  timeout "$(left)" $launch -m monai.bundle run training --config_file "[$configs]" --dataset_dir /tmp/gen/train \
    --output_dir "$runs/$name" --autoencoder_ckpt "$ae" --condition_key class --use_mlflow False \
    --deterministic False --max_epochs 1000 --epoch_length 1000 --time_limit "${STAGE_SECONDS:-300}" "$@" "${resume[@]}" \
    >>"$runs/$name.log" 2>&1
  [[ -n "${watcher:-}" ]] && { sleep 3; kill "$watcher"; }
  [[ "${EVAL:-1}" == 0 ]] && return
  timeout "$(left)" python3 -m scripts.evaluate_generation --diffusion_ckpt "$runs/$name/model.pt" --autoencoder_ckpt "$ae" \
    --train_dir /tmp/gen/train --val_dir /tmp/gen/val --output_dir "/tmp/eval/$name" --num_samples "${NUM_SAMPLES:-8}" --seed "${SEED:-0}" \
    >"/tmp/eval/$name.log" 2>&1
  (( ${NUM_SAMPLES:-8} >= 16 )) && timeout "$(left)" python3 docs/study/distance_draw.py "/tmp/eval/$name" \
    --diffusion_ckpt "$runs/$name/model.pt" --val_dir /tmp/gen/val >"/tmp/eval/$name/draw.md" 2>&1
  (( ${NUM_SAMPLES:-8} >= 16 )) && timeout "$(left)" python3 docs/study/classifier_test.py "/tmp/eval/$name" \
    --diffusion_ckpt "$runs/$name/model.pt" --autoencoder_ckpt "$ae" --train_dir /tmp/gen/train --val_dir /tmp/gen/val \
    --condition T1 >"/tmp/eval/$name/classifier.md" 2>&1
  [[ "${SPEED:-1}" == 0 ]] && return
  timeout "$(left)" python3 docs/study/generation_speed.py "$runs/$name/model.pt" "$ae" "/tmp/eval/$name/speed.json" \
    >"/tmp/eval/${name}_speed.log" 2>&1
}

names=()
while read -r name gpu ae overlay rest; do
  [[ -z "$name" || "$name" == \#* ]] && continue
  names+=("$name")
  eval "stage $name $gpu $ae $overlay $rest" &
done <"$spec"
wait

for name in "${names[@]}"; do
  echo "## $name"
  grep -E "Epoch\[[0-9]+\] Metrics|scale factor|Error|error|resum" "$runs/$name.log" | tail -n 6
  cat "/tmp/eval/$name/generation.md" 2>/dev/null || tail -n 5 "/tmp/eval/$name.log"
  cat "/tmp/eval/$name/draw.md" "/tmp/eval/$name/classifier.md" 2>/dev/null
  cat "/tmp/eval/$name/speed.json" 2>/dev/null | tr -d '\n' | cut -c1-600; echo
done | tee /tmp/eval/summary.md
for name in "${names[@]}"; do
  mkdir -p "/tmp/eval/$name"
  grep -v -i "warn" "$runs/$name.log" | grep -E "Epoch|scale|INFO - >|Error|resum" >"/tmp/eval/$name/train.log"
  rm -rf "/tmp/eval/$name/samples"
done
tar czf "$OUT/results.tar.gz" -C /tmp/eval .
keep=(${KEEP:-${names[@]}})
rm -rf /tmp/kept; mkdir -p /tmp/kept
python3 - "$runs" "${keep[@]}" <<'PY'
import os, sys, torch
runs, names = sys.argv[1], sys.argv[2:]
packed = 0  # what comes back from the host: 64 MiB in all, so whole models up to 60 MB, in KEEP's order
for name in names:
    if not os.path.isfile(f"{runs}/{name}/model.pt"):
        print(f"{name}: no model.pt")
        continue
    ckpt = torch.load(f"{runs}/{name}/model.pt", map_location="cpu", weights_only=True)
    ckpt["diffusion"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["diffusion"].items()}
    torch.save(ckpt, f"/tmp/kept/{name}.pt")
    if packed + os.path.getsize(f"/tmp/kept/{name}.pt") > 60e6:
        print(f"{name}: not packed, past the 60 MB that can come back (name fewer runs in KEEP)")
        os.remove(f"/tmp/kept/{name}.pt")
        continue
    packed += os.path.getsize(f"/tmp/kept/{name}.pt")
PY
(cd /tmp/kept && tar cf /tmp/models.tar $(for n in "${keep[@]}"; do [[ -f "$n.pt" ]] && echo "$n.pt"; done)) && split -b 15M /tmp/models.tar "$OUT/models.tar.part_"
ls -la "$OUT"
