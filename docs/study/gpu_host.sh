# Sourced by the throughput studies (scaling.sh, scaling_graphs.sh, profile_scaling.sh, cudagraph_training.sh,
# cudagraph_steps.sh, host_sync.sh, default_training.sh) from the bundle's root on a GPU host: the results folder $OUT, MONAI and
# its dependencies from .whl/ installed once into .data/site (kept by a warm host), the generation volumes
# unpacked into /tmp/gen, and how to launch a training on one GPU or several.
mkdir -p "${OUT:?set OUT to the folder for the results}"
site=$PWD/.data/site
if [[ ! -d $site/monai ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD PYTHONWARNINGS=ignore OMP_NUM_THREADS=8
mkdir -p /tmp/gen
[[ -d /tmp/gen/train ]] || tar xJf .data/generation.tar.xz -C /tmp/gen || exit 1

launcher() {  # gpus: python3 for one, torchrun with a process per GPU for more
  if (( $1 > 1 )); then echo "python3 -m torch.distributed.run --standalone --nproc_per_node=$1"; else echo python3; fi
}

with_overlay() {  # gpus configs: the configs, with the multi-GPU overlay of the training they name for more than one GPU
  local configs=$2
  if (( $1 > 1 )); then
    [[ $configs == *train_diffusion* ]] && configs+=",'configs/multi_gpu_train_diffusion.yaml'" \
                                        || configs+=",'configs/multi_gpu_train_autoencoder.yaml'"
  fi
  echo "$configs"
}

summarise() {  # logs_folder: each run's metric lines and errors, the exits and the card into $OUT/summary.md; the logs into $OUT/logs.tar.gz
  local logs=$1 log
  for log in "$logs"/*.log; do
    echo "## $(basename "$log" .log)"
    grep -E "Epoch\[[0-9]+\] Metrics|Error|error|resum|torch.compile|skipping cudagraphs|Traceback" "$log" | grep -v -i warn | tail -n 12
  done >"$OUT/summary.md"
  cat "$logs/exits.txt" "$logs/device.txt" >>"$OUT/summary.md"
  cat "$OUT/summary.md"
  tar czf "$OUT/logs.tar.gz" -C "$logs" .
}
