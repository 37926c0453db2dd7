"""Whole-volume against tiled reconstruction, with the bundle's measure: for each volume of a folder,
PSNR of the whole-volume reconstruction and of TiledInferer reconstructions at several window
sizes and margins (preprocessed grid; 'whole' means one window).

    python docs/study/tiling_check.py CHECKPOINT DATA_DIR [--roi 64 96 128] [--margin 16 32]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from scripts.data import list_volumes
from scripts.engines import autocast
from scripts.evaluate import Evaluation
from scripts.inference import TiledInferer
from scripts.metrics import body_mask, masked_quality


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("data_dir")
    p.add_argument("--roi", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--margin", type=int, nargs="+", default=[16, 32])
    args = p.parse_args()
    # the network and preprocessing exactly as the evaluation command builds them from the checkpoint
    evaluation = Evaluation(args.checkpoint, tempfile.mkdtemp(), mixed_precision="bf16")
    model, transform, device = evaluation.network, evaluation.transform, evaluation.device
    multiple = evaluation.autoencoder.spatial_multiple
    print("volume | whole | " + " | ".join(f"roi {r} m {m}" for r in args.roi for m in args.margin if r > 2 * m))
    for item in list_volumes(args.data_dir):
        x = transform(item)["image"].as_tensor()[None].to(device)
        mask = body_mask(x)
        with torch.no_grad(), autocast(device, evaluation.amp_dtype):
            whole = model(x).float()
            cells = [masked_quality(x, whole, mask)["psnr"]]
            for r in args.roi:
                for m in args.margin:
                    if r > 2 * m:
                        tiled = TiledInferer((r,) * 3, m, multiple)(x, model).float()
                        cells.append(masked_quality(x, tiled, mask)["psnr"])
        print(f"{item['image'].split('/')[-1]} {tuple(x.shape[2:])} | " + " | ".join(f"{c:.2f}" for c in cells), flush=True)


if __name__ == "__main__":
    main()
