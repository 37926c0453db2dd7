"""Seconds for one whole-volume reconstruction (``Reconstructor``, no gradients, float32) of a random
cube with an autoencoder checkpoint, on the machine's CPU threads: the median of 5 after one warm-up.
Run from the bundle's root; run it in two checkouts to compare code paths.

    PYTHONPATH=. python docs/study/reconstruct_timing.py models/model_autoencoder.pt [SIZE]
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from scripts.networks import FactorAutoencoderKL, Reconstructor


def main(ckpt: str, size: str = "128") -> None:
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    network = Reconstructor(FactorAutoencoderKL(**saved["autoencoder_args"])).eval()
    network.load_state_dict(saved["autoencoder"])
    x = torch.rand(1, 1, *(3 * [int(size)]), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        for _ in range(6):
            start = time.perf_counter()
            network(x)
            times.append(time.perf_counter() - start)
    print(f"{ckpt}: {statistics.median(times[1:]):.3f} s per {size}^3 reconstruction, {torch.get_num_threads()} threads")


if __name__ == "__main__":
    main(*sys.argv[1:])
