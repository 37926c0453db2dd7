"""Can a network started at its shortcut's code fit two patches better than the code does?

A diagnosis on a CPU in minutes: a new network (started at the code, as the training config starts
it) trained on the same two 32^3 patches of a training volume, with the posterior's noise or
without, under L1 or the squared error, and with the output layers (the decoder's output
convolution and ``quant_conv_mu``, both started at zero) at the learning rate or a fraction of it.
Prints the PSNR of the reconstruction from the posterior's mean before training and along it.

    PYTHONPATH=. python docs/study/two_patches.py VOLUME.nii [--loss mse] [--noise 0] [--output_lr_scale 0.01]
"""

from __future__ import annotations

import argparse
import ast
import time

import nibabel as nib
import numpy as np
import torch

from scripts.networks import FactorAutoencoderKL, init_posterior, parameter_groups, start_at_shortcut


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("volume")
    p.add_argument("--factors", default="[4, 2]")
    p.add_argument("--latent_channels", type=int, default=128)
    p.add_argument("--shortcut", default="cosine")
    p.add_argument("--loss", choices=("l1", "mse"), default="l1")
    p.add_argument("--noise", type=float, default=1.0, help="the posterior's noise: 1 as in training, 0 none")
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--output_lr_scale", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--size", type=int, default=32)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    v = np.asarray(nib.load(args.volume).dataobj, dtype=np.float32)
    lo, hi = np.percentile(v, [0.5, 99.5])
    v = (v - lo) / (hi - lo)
    c, h = [s // 2 for s in v.shape], args.size // 2
    patches = [v[c[0] - h : c[0] + h, c[1] - h : c[1] + h, c[2] - h : c[2] + h],
               v[c[0] - h - 16 : c[0] + h - 16, c[1] - h + 16 : c[1] + h + 16, c[2] - h : c[2] + h]]  # fmt: skip
    x = torch.from_numpy(np.stack(patches))[:, None].float()
    net = FactorAutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=[32, 64, 64],
                              downsample_factors=ast.literal_eval(args.factors), latent_channels=args.latent_channels,
                              shortcut=args.shortcut, num_res_blocks=1, attention_levels=[False] * 3, norm="channel")  # fmt: skip
    net = start_at_shortcut(init_posterior(net, -8.0))
    opt = torch.optim.Adam(parameter_groups(net, args.learning_rate, args.output_lr_scale))  # the training config's groups

    def psnr() -> float:
        with torch.no_grad():
            return float(10 * torch.log10(1 / ((net.decode(net.encode(x)[0]) - x) ** 2).mean()))

    line, start = [f"code {psnr():.2f} |"], time.time()
    for step in range(1, args.steps + 1):
        mu, sigma = net.encode(x)
        error = net.decode(mu + args.noise * sigma * torch.randn_like(sigma)) - x
        loss = error.abs().mean() if args.loss == "l1" else (error**2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % (args.steps // 8) == 0:
            line.append(f"{step}: {psnr():.2f}")
    print(" ".join(line), f"({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
