# Sourced by the throughput studies (scaling.sh, cudagraph_training.sh, cudagraph_steps.sh) from the
# bundle's root on a GPU host: the results folder $OUT, MONAI and its dependencies from .whl/ installed
# once into .data/site (kept by a warm host), and the generation volumes unpacked into /tmp/gen.
mkdir -p "${OUT:?set OUT to the folder for the results}"
site=$PWD/.data/site
if [[ ! -d $site/monai ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl || exit 1
fi
export PYTHONPATH=$site:$PWD PYTHONWARNINGS=ignore OMP_NUM_THREADS=8
mkdir -p /tmp/gen
[[ -d /tmp/gen/train ]] || tar xJf .data/generation.tar.xz -C /tmp/gen || exit 1
