"""Speed and memory of the diffusion stage for one trained pair (docs/generation.md): a training step
of the UNet as the training config runs it (on latents encoded once: noise, UNet with class labels,
MSE, backward, Adam; bf16) and sampling through configs/inference.yaml (DDIM steps and decoding).

    python docs/study/generation_speed.py MODEL_PT AUTOENCODER_PT OUT_JSON [--train_size 128 128 128]
        [--batch_size 4] [--sample_size 256 256 128] [--steps 50]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from monai.bundle import ConfigWorkflow  # noqa: E402
from monai.networks.schedulers import DDPMScheduler  # noqa: E402

from scripts.checkpoints import load_checkpoint  # noqa: E402
from scripts.diffusion import ClassConditionedDiffusionModelUNet, latent_scale  # noqa: E402
from scripts.networks import FactorAutoencoderKL  # noqa: E402


def training_step(ckpt: dict, ae_path: str, size: list[int], batch: int, device: torch.device) -> dict:
    """The encoding of a batch of volumes (once per training run) and a UNet step on its latents."""
    autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"]).to(device).eval()
    autoencoder.load_state_dict(load_checkpoint(ae_path)["autoencoder"])
    unet = ClassConditionedDiffusionModelUNet(**ckpt["diffusion_args"]).to(device)
    optimizer = torch.optim.Adam(unet.parameters(), lr=1e-4, fused=True)
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    images = torch.rand(batch, 1, *size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device) if ckpt["diffusion_args"].get("num_class_embeds") else None
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        z_mu, z_sigma = autoencoder.encode(images)
    torch.cuda.synchronize()
    encode_s = time.perf_counter() - start
    latents = z_mu * latent_scale(ckpt["scale_factor"], z_mu.shape[1]).to(device)
    del autoencoder, images

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", torch.bfloat16):
            noise = torch.randn_like(latents)
            t = torch.randint(0, 1000, (batch,), device=device)
            pred = unet(scheduler.add_noise(latents, noise, t), timesteps=t, context=labels)
            loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(20):
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {
        "step_s": statistics.median(times),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "latent": list(latents.shape[1:]),
        "encode_batch_s": encode_s,
    }


def sampling(model: str, ae_path: str, size: list[int], steps: int, device: torch.device) -> dict:
    with tempfile.TemporaryDirectory() as out:
        classes = load_checkpoint(model).get("classes") or []
        workflow = ConfigWorkflow(
            config_file=str(REPO / "configs" / "inference.yaml"), meta_file=None, logging_file=False, workflow_type=None,
            bundle_root=str(REPO), device=device, diffusion_ckpt=model, autoencoder_ckpt=ae_path, output_dir=out,
            image_size=size, num_inference_steps=steps, num_samples=2, condition=classes[0] if classes else None,
        )
        workflow.initialize()
        torch.cuda.reset_peak_memory_stats()
        workflow.run()
        rows = workflow.parser.get_parsed_content("evaluator").results.rows
        workflow.finalize()
    return {"sample_s": float(rows[-1]["seconds"]), "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "guided": bool(classes)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("autoencoder")
    p.add_argument("output")
    p.add_argument("--train_size", type=int, nargs=3, default=[128, 128, 128])
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--sample_size", type=int, nargs=3, default=[256, 256, 128])
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    device = torch.device("cuda:0")
    ckpt = load_checkpoint(args.model)
    result = {
        "device": torch.cuda.get_device_name(device),
        "autoencoder_args": ckpt["autoencoder_args"],
        "train": training_step(ckpt, args.autoencoder, args.train_size, args.batch_size, device),
        "sample": sampling(args.model, args.autoencoder, args.sample_size, args.steps, device),
        "settings": vars(args),
    }
    Path(args.output).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
