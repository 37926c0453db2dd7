"""How much the Fréchet distance of `scripts.evaluate_generation` moves with the draw of the samples
(docs/generation.md): from one evaluation with many samples per class (`--num_samples 32`), the
distance of all of them and of each disjoint subset of `--subset` (8, what the study's stages use),
against the same held-out volumes, on the same features.

    python -m scripts.evaluate_generation ... --num_samples 32 --output_dir EVAL
    PYTHONPATH=. python docs/study/distance_draw.py EVAL --diffusion_ckpt M --val_dir VAL --subset 8

Reads the samples that evaluation wrote (EVAL/samples/<class>/*.nii.gz); writes EVAL/draw.json and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from scripts.checkpoints import load_checkpoint
from scripts.data import list_volumes
from scripts.evaluate_generation import EncoderFeatures, RealVolumes, by_class, frechet_distance, read_sample
from scripts.networks import FactorAutoencoderKL


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("eval_dir", type=Path)
    p.add_argument("--diffusion_ckpt", required=True)
    p.add_argument("--val_dir", required=True)
    p.add_argument("--feature_ckpt", default="models/model_features.pt")
    p.add_argument("--subset", type=int, default=8)
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    classes, key = list(ckpt.get("classes") or []), ckpt.get("condition_key")
    real = RealVolumes(ckpt, FactorAutoencoderKL(**ckpt["autoencoder_args"]).total_factor, device)
    features = EncoderFeatures(args.feature_ckpt, device)
    held_out = by_class(list_volumes(args.val_dir), key, classes)
    results = {}
    for name in classes:
        paths = sorted((args.eval_dir / "samples" / name).rglob("*.nii.gz"))
        if not held_out[name] or len(paths) < 2 * args.subset:
            continue
        val = torch.cat([features(real(v)) for v in held_out[name]])
        feats = [features(read_sample(s)) for s in paths]
        subsets = [feats[i : i + args.subset] for i in range(0, len(feats) - args.subset + 1, args.subset)]
        draws = [frechet_distance(torch.cat(s), val) for s in subsets]
        results[name] = {
            "samples": len(feats),
            "fd_all": frechet_distance(torch.cat(feats), val),
            f"fd_subsets_of_{args.subset}": draws,
            "mean": statistics.mean(draws),
            "stdev": statistics.stdev(draws),
        }
    (args.eval_dir / "draw.json").write_text(json.dumps(results, indent=1) + "\n")
    print(f"| class | samples | distance, all | distance of each {args.subset} | mean | standard deviation |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        each = ", ".join(f"{d:.1f}" for d in r[f"fd_subsets_of_{args.subset}"])
        print(f"| {name} | {r['samples']} | {r['fd_all']:.1f} | {each} | {r['mean']:.1f} | {r['stdev']:.1f} |")


if __name__ == "__main__":
    main()
