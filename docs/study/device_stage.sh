#!/usr/bin/env bash
# One study stage on a GPU host: install the wheels in .whl/ (MONAI and its pure-Python needs, for a
# host without them), unpack .data/data.tar.xz, run the spec, evaluate the kept runs on the validation
# volumes, and leave in the folder that $OUT names the curves, the evaluations, the trimmed logs and
# models.tar (the kept runs' weights in half precision) in parts of 15 MB.
#   OUT=results CALL_SECONDS=570 BEST_OF="s8_4x s8_8x" bash docs/study/device_stage.sh SPEC_FILE [KEEP_RUN ...]
#   PREPARE_ONLY=1 OUT=results bash docs/study/device_stage.sh -      (install and unpack only)
#   PACK=0 STAGE_SECONDS=450 OUT=results bash docs/study/device_stage.sh SPEC_FILE   (train only)
#   EVAL=0 OUT=results bash docs/study/device_stage.sh SPEC_FILE KEEP_RUN ...   (train, pack, evaluate elsewhere)
# Kept: the runs named, and the best run (by validation PSNR) of each name prefix in BEST_OF (default:
# the best run of the stage). CALL_SECONDS bounds the whole call (default 570): training is cut short
# so that the evaluation and the packing fit.
# The runs live in .data/ae_runs/STAGE, which a warm host keeps between calls: a run that has a
# checkpoint_last.pt resumes from it (run.sh), so a training longer than one call spans several, each
# run stopping cleanly after STAGE_SECONDS. PACK=0 trains only (the first calls of such a series);
# EVAL=0 packs the kept weights without evaluating them (scripts.evaluate on a CPU, later).
set -uo pipefail
deadline=$(( SECONDS + ${CALL_SECONDS:-570} - 30 ))  # 30 s to pack what there is
left() { echo $(( deadline - SECONDS > 1 ? deadline - SECONDS : 1 )); }
mkdir -p "${OUT:?set OUT to the folder for the results}"
spec=$1; shift
# A warm host keeps ignored folders of the working tree between calls: a first call may only install
# and unpack (PREPARE_ONLY=1) into .data/, so that the next one, soon after, can carry more weights.
site=$PWD/.data/site data=$PWD/.data/volumes runs=$PWD/.data/ae_runs/$(basename "$spec" .txt)  # one folder per stage
if [[ ! -d $site/monai ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD PYTHONWARNINGS=ignore
if [[ ! -d $data/val ]]; then
  mkdir -p "$data" && tar xJf .data/data.tar.xz -C "$data" || exit 1
fi
[[ "${PREPARE_ONLY:-0}" == 1 ]] && { ls "$data/train" | wc -l; exit 0; }
rm -rf /tmp/eval; mkdir -p /tmp/eval "$runs"; rm -f "$runs"/*.pt "$runs"/*.log  # what an earlier call packed
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout "$(( $(left) - 60 ))" bash docs/study/run.sh "$spec" "$data" "$runs"
pkill -f "output_dir $runs/"; sleep 2  # this stage's runs past their time_limit (a generation stage beside it runs on)
python3 docs/study/curves.py "$runs" --csv "$OUT/curves.csv" | tee "$OUT/summary.txt"
for d in "$runs"/*/; do grep -v -i "warn" "$d/log.txt" | grep -v "^ *warnings\.\|^$" > "$runs/$(basename "$d").log"; done
tar czf "$OUT/logs.tar.gz" -C "$runs" $(cd "$runs" && ls *.log)
[[ "${PACK:-1}" == 0 ]] && exit 0
keep=("$@")
for prefix in ${BEST_OF:-""}; do
  keep+=($(awk -v p="$prefix" 'index($1, p) == 1 {print $1; exit}' "$OUT/summary.txt"))
done
[[ -z "${BEST_OF:-}" ]] && keep+=($(sed -n 1p "$OUT/summary.txt" | awk '{print $1}'))
# the bundle's evaluation of each kept run on the validation volumes, in their own grids, one per GPU
gpus=$(nvidia-smi -L | wc -l); i=0
[[ "${EVAL:-1}" == 0 ]] || for name in "${keep[@]}"; do
  CUDA_VISIBLE_DEVICES=$(( i++ % gpus )) timeout "$(left)" python3 -m scripts.evaluate --dataset_dir "$data/val" \
    --checkpoint "$runs/$name/model_autoencoder.pt" --output_dir "/tmp/eval/$name" >"/tmp/eval/$name.log" 2>&1 &
done
wait
[[ "${EVAL:-1}" == 0 ]] || for name in "${keep[@]}"; do
  { echo "## $name"; cat "/tmp/eval/$name/evaluation.md" 2>/dev/null || tail -n 5 "/tmp/eval/$name.log"; echo; } >>"$OUT/eval.md"
done
python3 - "$runs" "${keep[@]}" <<'PY'
import os, sys, torch
runs = sys.argv[1]
for name in dict.fromkeys(sys.argv[2:]):
    path = f"{runs}/{name}/model_autoencoder.pt"
    if not os.path.isfile(path):
        print(f"{name}: no model_autoencoder.pt")
        continue
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    ckpt["autoencoder"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["autoencoder"].items()}
    torch.save(ckpt, f"{runs}/{name}.pt")
    print("kept", name)
PY
(cd "$runs" && tar cf /tmp/models.tar $(ls *.pt)) && split -b 15M /tmp/models.tar "$OUT/models.tar.part_"
[[ "${TILING:-0}" == 1 ]] && python3 docs/study/tiling_check.py "$runs/${keep[0]}/model_autoencoder.pt" "$data/val" | tee "$OUT/tiling.txt"
[[ "${EVAL:-1}" == 0 ]] || grep -A 0 "^## \|mean of" "$OUT/eval.md"
ls -la "$OUT"
