#!/usr/bin/env bash
# One study stage on a GPU host: install the wheels in .whl/ (MONAI and its pure-Python needs, for a
# host without them), unpack .data/data.tar.xz, run the spec, and leave in the folder that $OUT names
# the curves, the trimmed logs, the best runs' weights in half precision and their evaluation.
#   OUT=results bash docs/study/device_stage.sh SPEC_FILE [KEEP_RUN ...]
set -uo pipefail
mkdir -p "${OUT:?set OUT to the folder for the results}"
spec=$1; shift
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD
mkdir -p /tmp/data && tar xJf .data/data.tar.xz -C /tmp/data || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
bash docs/study/run.sh "$spec" /tmp/data /tmp/runs | tee "$OUT/summary.txt"
cp /tmp/runs/curves.csv "$OUT/"
for d in /tmp/runs/*/; do grep -v -i "warn" "$d/log.txt" | grep -v "^ *warnings\.\|^$" > "/tmp/runs/$(basename "$d").log"; done
tar czf "$OUT/logs.tar.gz" -C /tmp/runs $(cd /tmp/runs && ls *.log)
# the best run by validation PSNR, and any named ones, in half precision
best=$(sed -n 1p "$OUT/summary.txt" | awk '{print $1}')
python3 - "$OUT" "$best" "$@" <<'PY'
import sys, torch
out, names = sys.argv[1], dict.fromkeys(sys.argv[2:])
for name in names:
    ckpt = torch.load(f"/tmp/runs/{name}/model_autoencoder.pt", map_location="cpu", weights_only=True)
    ckpt["autoencoder"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["autoencoder"].items()}
    torch.save(ckpt, f"{out}/{name}.pt")
    print("kept", name)
PY
# the bundle's evaluation of each kept model on the validation volumes, in their own grids
names=$(printf '%s\n' "$best" "$@" | sort -u)
for name in $names; do  # side by side: one evaluation per kept run
  python3 -m scripts.evaluate --dataset_dir /tmp/data/val --checkpoint "/tmp/runs/$name/model_autoencoder.pt" \
    --output_dir "/tmp/eval/$name" >"/tmp/eval_$name.log" 2>&1 &
done
wait
for name in $names; do
  { echo "## $name"; cat "/tmp/eval/$name/evaluation.md" || tail -n 5 "/tmp/eval_$name.log"; echo; } >>"$OUT/eval.md"
done
[[ "${TILING:-0}" == 1 ]] && python3 docs/study/tiling_check.py "/tmp/runs/$best/model_autoencoder.pt" /tmp/data/val | tee "$OUT/tiling.txt"
grep -A 0 "^## \|mean of" "$OUT/eval.md"
