"""How good the diffusion model's samples are, measured with no downloaded network.

    python -m scripts.evaluate_generation --diffusion_ckpt models/model.pt --autoencoder_ckpt models/model_autoencoder.pt \
        --train_dir TRAINING_SCANS --val_dir HELD_OUT_SCANS --output_dir eval/generation --num_samples 8

For each class the model knows (or once, if it is unconditional) it samples ``num_samples`` volumes
with the bundle's sampling config (``configs/inference.yaml``), and compares them with real volumes
prepared as the model's training volumes were (the spacing, intensity mapping and image size that
``model.pt`` records):

- Fréchet distance (as MONAI's ``FIDMetric`` defines it) on features of the bundle's own autoencoder (its
  encoder's last hidden layer, mean and standard deviation over each of 4x4x4 regions of the
  volume; ``--feature_ckpt``, the same network for every model compared: by default
  ``models/model_features.pt``, a trained 4x autoencoder kept fixed so that distances compare across
  versions of the shipped models), against the held-out
  volumes of the class; beside it three references: the training volumes against the same held-out
  ones (real against real); the training volumes encoded and decoded by the autoencoder against
  them, the distance that the autoencoder alone costs, below which no diffusion model on its latents
  can be expected to go; and decoded noise against them.
- Diversity: the mean MS-SSIM between two samples; beside it the same between two training volumes.
- Empty space: the mean intensity of the eight corner cubes of each volume (an eighth of its size per
  axis), which in a head or body volume hold air: 0 in the training volumes, whatever a model
  adds there is speckle that a reader sees at once and the distance does not weigh; beside it the
  same for the training volumes and for them through the autoencoder.
- Copies: for each sample, the SSIM to its nearest training volume, which is named (``generation.json``'s
  ``nearest_volumes``, counted under the table: a model that copies often copies one head); beside it the same between each
  training volume and its nearest other one, largest and median (each pair in ``generation.json``,
  the largest named under the table). A sample closer than the largest is a copy. And the median of each held-out volume's SSIM to its nearest training volume: how near a
  new real volume of the class comes, so that samples lying far nearer than that show a model that
  has learned its training volumes rather than their kind.
- A PNG of mid-slices in the three planes, a row per sample, for each class.

The diversity and the copies compare volumes as ``compared`` shows them: the empty space set to 0
and the detail finer than about 3 mm (at 2 mm voxels) smoothed away. Speckle, around a sample or
inside it, would otherwise make two samples of one anatomy look unlike each other and hide how near
a sample's anatomy comes to a training volume.

Writes ``generation.json``, ``generation.md`` and ``grid_<class>.png`` into ``output_dir``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric
from monai.networks.layers import GaussianFilter
from monai.transforms import Compose, ResizeWithPadOrCrop
from torch.nn import functional as F

from scripts.checkpoints import check_autoencoder_fingerprint, load_checkpoint, load_network
from scripts.data import list_volumes, preprocessing
from scripts.diffusion import latent_scale
from scripts.io import atomic_path, write_atomic
from scripts.networks import FactorAutoencoderKL

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
REGIONS = 4  # feature regions per axis
BODY_THRESHOLD = 0.04  # of a voxel's 5x5x5 mean: 0 in the air of a training volume, 0.01 to 0.03 in a sample's speckle
SMOOTHING = 1.5  # voxels, the Gaussian's sigma: at 2 mm it takes out what is finer than about 3 mm, the speckle with it
UNCONDITIONAL = "all"


class RealVolumes:
    """Real volumes prepared as the diffusion model's training volumes were, in [0, 1]."""

    def __init__(self, ckpt: dict, total_factor: Sequence[int], device: torch.device) -> None:
        self.device = device
        prep = dict(ckpt.get("preprocessing") or {})
        self.transform = Compose(
            preprocessing(
                1,
                ckpt.get("spacing"),
                prep.get("modality", "mri"),
                prep.get("intensity_percentiles", [0.5, 99.5]),
                prep.get("ct_window", [-1000, 1000]),
                total_factor,
            )
        )
        self.resize = ResizeWithPadOrCrop(ckpt["image_size"])  # centred, as the training volumes were

    def __call__(self, path: str) -> torch.Tensor:
        image = self.transform({"image": path})["image"]
        return self.resize(image).as_tensor().float().clamp(0, 1).to(self.device)


class EncoderFeatures:
    """Per-region features of a volume from a trained autoencoder of this bundle: the input of its
    encoder's last normalisation (the deepest hidden layer), averaged and spread over each of
    ``REGIONS``^3 regions. The same network scores every model, so their distances compare."""

    def __init__(self, checkpoint: str | Path, device: torch.device) -> None:
        ckpt = load_checkpoint(checkpoint, "feature_ckpt")
        self.network = FactorAutoencoderKL(**ckpt["autoencoder_args"])
        load_network(self.network, checkpoint, "autoencoder", ckpt["autoencoder_args"], "feature_ckpt")
        self.network.to(device).eval()
        self.device = device
        self._hidden: torch.Tensor | None = None
        self.network.encoder.blocks[-2].register_forward_pre_hook(self._keep)

    def _keep(self, module: torch.nn.Module, args: tuple) -> None:
        self._hidden = args[0]

    @torch.no_grad()
    def __call__(self, volume: torch.Tensor) -> torch.Tensor:
        self.network.encode(volume[None].to(self.device))
        h = self._hidden.float()[0]  # (C, x, y, z)
        regions = [torch.tensor_split(torch.arange(s), REGIONS) for s in h.shape[1:]]
        rows = []
        for ix, iy, iz in itertools.product(*regions):
            block = h[:, ix[0] : ix[-1] + 1, iy[0] : iy[-1] + 1, iz[0] : iz[-1] + 1].flatten(1)
            rows.append(torch.cat([block.mean(1), block.std(1, unbiased=False)]))
        return torch.stack(rows).cpu()


def empty_space(volume: torch.Tensor, share: int = 8) -> float:
    """The mean intensity of the volume's eight corner cubes, each ``1/share`` of it per axis."""
    sides = [max(1, size // share) for size in volume.shape[-3:]]
    ends = [(slice(0, n), slice(size - n, size)) for n, size in zip(sides, volume.shape[-3:])]
    return float(torch.stack([volume[..., x, y, z].mean() for x, y, z in itertools.product(*ends)]).mean())


def body_mask(volume: torch.Tensor) -> torch.Tensor:
    """Where the volume is not empty space: voxels whose 5x5x5 mean is above ``BODY_THRESHOLD``."""
    return F.avg_pool3d(volume[None], 5, stride=1, padding=2)[0] > BODY_THRESHOLD


def body(volume: torch.Tensor) -> torch.Tensor:
    """The volume with its empty space set to 0."""
    return volume * body_mask(volume)


def compared(volume: torch.Tensor) -> torch.Tensor:
    """The volume as the diversity and the copy check see it: its ``body``, smoothed by a Gaussian of
    ``SMOOTHING`` voxels. Speckle hides anatomy from SSIM: around a sample it pulls the sample's SSIM to
    its own training volume down, and inside the head it does the same where a reader sees one brain."""
    return GaussianFilter(spatial_dims=3, sigma=SMOOTHING)(body(volume)[None])[0]


MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # the five scales of Wang et al.
MS_SSIM_KERNEL = 7


def ms_ssim_metric(image_size: Sequence[int]) -> MultiScaleSSIMMetric:
    """MS-SSIM with as many of the five standard scales as MONAI allows for the volume's size (each
    halves it; the coarsest must still hold the kernel), their weights renormalised."""
    scales = max(k for k in range(1, len(MS_SSIM_WEIGHTS) + 1) if min(image_size) // max(1, k - 1) ** 2 > MS_SSIM_KERNEL - 1)
    weights = MS_SSIM_WEIGHTS[:scales]
    return MultiScaleSSIMMetric(
        spatial_dims=3, data_range=1.0, kernel_size=MS_SSIM_KERNEL, weights=tuple(w / sum(weights) for w in weights)
    )


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two sets of feature rows, as MONAI's
    ``FIDMetric`` defines it, with the matrix square root taken symmetrically (eigh of
    sqrt(S1) S2 sqrt(S1)), which needs no SciPy and is exact for the rank-deficient covariances of a
    few volumes."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    root_a = _sqrt_psd(cov_a)
    cross = _sqrt_psd(root_a @ cov_b @ root_a)
    return float((mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * torch.trace(cross))


def pairwise(volumes: Sequence[torch.Tensor], metric: torch.nn.Module | object) -> list[float]:
    return [float(metric(a[None], b[None]).mean()) for a, b in itertools.combinations(volumes, 2)]


def nearest_named(samples: Sequence[torch.Tensor], references: dict, ssim: SSIMMetric) -> list[tuple[float, object]]:
    """Each sample's SSIM to its nearest reference, and that reference's key: which volume it lies nearest."""
    return [max((float(ssim(s[None], r[None]).mean()), key) for key, r in references.items()) for s in samples]


def nearest(samples: Sequence[torch.Tensor], references: Sequence[torch.Tensor], ssim: SSIMMetric) -> list[float]:
    return [score for score, _ in nearest_named(samples, dict(enumerate(references)), ssim)]


@torch.no_grad()
def through_autoencoder(autoencoder: FactorAutoencoderKL, volume: torch.Tensor) -> torch.Tensor:
    """A real volume encoded and decoded (its latent mean), in [0, 1] as samples are written: what the
    autoencoder alone makes of it, the best a diffusion model on its latents can give back."""
    return autoencoder.reconstruct(volume[None])[0].float().clamp(0, 1)


def save_grid(volumes: Sequence[torch.Tensor], path: Path, title: str) -> None:
    """Mid-slices of each volume in the three planes (axial, coronal, sagittal), a row per volume."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(volumes), 3, figsize=(6, 2 * len(volumes)), squeeze=False)
    for row, volume in enumerate(volumes):
        v = volume[0].cpu().numpy()
        x, y, z = (s // 2 for s in v.shape)
        for col, sl in enumerate((v[:, :, z], v[:, y, :], v[x, :, :])):
            axes[row, col].imshow(np.rot90(sl), cmap="gray", vmin=0, vmax=1)
            axes[row, col].set_axis_off()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=60, format="png")
    plt.close(fig)


def sample(config: dict, output_dir: Path, condition: str | None) -> list[torch.Tensor]:
    """Volumes sampled through the bundle's sampling config, the path users run."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(REPO / "configs" / "inference.yaml"),
        meta_file=None,
        logging_file=False,
        workflow_type=None,
        **dict(config, output_dir=str(output_dir), condition=condition),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    return [read_sample(row["output"]) for row in workflow.parser.get_parsed_content("evaluator").results.rows]


def read_sample(path: str | Path) -> torch.Tensor:
    """A volume that sampling wrote, as the measures take it: (1, X, Y, Z), float32, in [0, 1]."""
    return torch.from_numpy(np.asarray(nib.load(path).dataobj, dtype=np.float32))[None]


def by_class(items: Sequence[dict], key: str | None, classes: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {UNCONDITIONAL: [str(item["image"]) for item in items]}
    for name in classes:
        groups[name] = [str(item["image"]) for item in items if key and str(item.get(key)) == name]
    return groups


def evaluate(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda:0" if torch.cuda.is_available() else "cpu"))
    ckpt = load_checkpoint(args.diffusion_ckpt, "diffusion_ckpt")
    if not ckpt.get("image_size"):
        raise ValueError(f"diffusion_ckpt '{args.diffusion_ckpt}' records no image_size; it predates whole-volume training.")
    classes, key = list(ckpt.get("classes") or []), ckpt.get("condition_key")
    autoencoder = FactorAutoencoderKL(**ckpt["autoencoder_args"])
    load_network(autoencoder, args.autoencoder_ckpt, "autoencoder", ckpt["autoencoder_args"], "autoencoder_ckpt")
    check_autoencoder_fingerprint(ckpt, autoencoder, args.diffusion_ckpt, args.autoencoder_ckpt)
    autoencoder.to(device).eval()
    real = RealVolumes(ckpt, autoencoder.total_factor, device)
    features = EncoderFeatures(args.feature_ckpt, device)
    train_items, val_items = list_volumes(args.train_dir), list_volumes(args.val_dir)
    train_groups, val_groups = by_class(train_items, key, classes), by_class(val_items, key, classes)
    volumes = {p: real(p) for p in {*train_groups[UNCONDITIONAL], *val_groups[UNCONDITIONAL]}}
    feats = {p: features(v) for p, v in volumes.items()}
    recon_feats, recon_empty = {}, {}
    for p in train_groups[UNCONDITIONAL]:
        recon = through_autoencoder(autoencoder, volumes[p])
        recon_feats[p], recon_empty[p] = features(recon), empty_space(recon)
    ssim = SSIMMetric(spatial_dims=3, data_range=1.0)
    ms_ssim = ms_ssim_metric(ckpt["image_size"])

    config = dict(
        bundle_root=str(REPO),
        device=device,
        diffusion_ckpt=str(args.diffusion_ckpt),
        autoencoder_ckpt=str(args.autoencoder_ckpt),
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        seed=args.seed,
    )
    # decoded noise: what the autoencoder makes of latents with no diffusion model at all
    generator = torch.Generator().manual_seed(args.seed)
    latent = [ckpt["autoencoder_args"]["latent_channels"], *autoencoder.latent_shape(ckpt["image_size"])]
    scale = latent_scale(ckpt["scale_factor"], latent[0], args.diffusion_ckpt).to(device)
    with torch.no_grad():
        noise = [
            autoencoder.decode_stage_2_outputs(torch.randn((1, *latent), generator=generator).to(device) / scale)[0]
            .float()
            .clamp(0, 1)
            for _ in range(args.num_samples)
        ]
    noise_feats = torch.cat([features(v) for v in noise])
    seen = {p: compared(volumes[p]) for p in train_groups[UNCONDITIONAL]}
    # each training volume's nearest other: the largest of these is the copy line, so name the pair that sets it
    train_nearest = {}
    for a in seen:
        score, b = nearest_named([seen[a]], {b: v for b, v in seen.items() if b != a}, ssim)[0]
        train_nearest[str(a)] = {"nearest": str(b), "ssim": score}
    train_pairs = [pair["ssim"] for pair in train_nearest.values()]
    settings = vars(args) | {"device": str(device), "body_threshold": BODY_THRESHOLD, "smoothing": SMOOTHING}
    results: dict = {"diffusion_ckpt": str(args.diffusion_ckpt), "classes": {}, "settings": settings, "train_nearest": train_nearest}
    for name in classes or [UNCONDITIONAL]:
        start = time.perf_counter()
        samples = [v.to(device) for v in sample(config, Path(args.output_dir) / "samples" / name, name if classes else None)]
        seconds = (time.perf_counter() - start) / len(samples)
        sample_feats = torch.cat([features(v) for v in samples])
        samples_seen = [compared(v) for v in samples]
        train_vols = [volumes[p] for p in train_groups[name]]
        held_out = val_groups[name]
        row: dict = {
            "samples": len(samples),
            "train_volumes": len(train_vols),
            "held_out_volumes": len(held_out),
            "seconds_per_sample": round(seconds, 2),
        }
        if held_out:
            val_feats = torch.cat([feats[p] for p in held_out])
            row["fd_samples"] = frechet_distance(sample_feats, val_feats)
            row["fd_real"] = frechet_distance(torch.cat([feats[p] for p in train_groups[name]]), val_feats)
            row["fd_autoencoder"] = frechet_distance(torch.cat([recon_feats[p] for p in train_groups[name]]), val_feats)
            row["fd_noise"] = frechet_distance(noise_feats, val_feats)
        row["empty_samples"] = float(np.mean([empty_space(v) for v in samples]))
        row["empty_train"] = float(np.mean([empty_space(v) for v in train_vols])) if train_vols else None
        row["empty_autoencoder"] = float(np.mean([recon_empty[p] for p in train_groups[name]])) if train_vols else None
        row["ms_ssim_samples"] = float(np.mean(pairwise(samples_seen, ms_ssim))) if len(samples) > 1 else None
        row["ms_ssim_train"] = float(np.mean(pairwise([seen[p] for p in train_groups[name]], ms_ssim))) if len(train_vols) > 1 else None
        # each sample's nearest training volume, named: which heads a model copies, if it copies
        scored = nearest_named(samples_seen, seen, ssim)
        near = [score for score, _ in scored]
        row["nearest_volumes"] = [Path(p).name for _, p in scored]
        row["nearest_ssim_max"], row["nearest_ssim_median"] = max(near), float(np.median(near))
        row["train_nearest_ssim_max"], row["train_nearest_ssim_median"] = max(train_pairs), float(np.median(train_pairs))
        row["copies"] = int(sum(n > max(train_pairs) for n in near))
        if held_out:
            held_out_near = nearest([compared(volumes[p]) for p in held_out], list(seen.values()), ssim)
            row["held_out_nearest_ssim_median"] = float(np.median(held_out_near))
        save_grid(samples[:4], Path(args.output_dir) / f"grid_{name}.png", f"samples: {name}")
        results["classes"][name] = row
        logger.info(f"{name}: {row}")
    return results


def markdown(results: dict) -> str:
    def f(value: float | None, digits: int = 2) -> str:
        return "–" if value is None else f"{value:.{digits}f}"

    lines = [
        f"Samples of `{results['diffusion_ckpt']}`. MS-SSIM and SSIM compare the volumes with their empty space set to 0, "
        f"smoothed by a Gaussian of {SMOOTHING} voxels.",
        "",
        "| class | samples | Fréchet distance: samples | real vs real | through the autoencoder | decoded noise | MS-SSIM between samples | between training volumes | "
        "empty space: samples / training / through the autoencoder | nearest-training SSIM, max / median | between training volumes, max / median | held-out volumes, median | copies |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["classes"].items():
        lines.append(
            f"| {name} | {r['samples']} | {f(r.get('fd_samples'), 1)} | {f(r.get('fd_real'), 1)} | {f(r.get('fd_autoencoder'), 1)} | {f(r.get('fd_noise'), 1)} | "
            f"{f(r['ms_ssim_samples'], 3)} | {f(r['ms_ssim_train'], 3)} | "
            f"{f(r['empty_samples'], 4)} / {f(r['empty_train'], 4)} / {f(r['empty_autoencoder'], 4)} | {f(r['nearest_ssim_max'], 3)} / {f(r['nearest_ssim_median'], 3)} | "
            f"{f(r['train_nearest_ssim_max'], 3)} / {f(r.get('train_nearest_ssim_median'), 3)} | {f(r.get('held_out_nearest_ssim_median'), 3)} | "
            f"{r['copies']} |"
        )
    if results.get("train_nearest"):
        line = max(results["train_nearest"].items(), key=lambda item: item[1]["ssim"])
        lines += ["", f"The copy line, {line[1]['ssim']:.3f}, is the SSIM between `{Path(line[0]).name}` and `{Path(line[1]['nearest']).name}`."]
    for name, r in results["classes"].items():
        counts = Counter(r.get("nearest_volumes", [])).most_common()
        if counts:
            lines += ["", f"Nearest training volumes of the {name} samples: " + ", ".join(f"`{v}` {n}" for v, n in counts) + "."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scripts.evaluate_generation", description=__doc__.split("\n\n")[0])
    p.add_argument("--diffusion_ckpt", default="models/model.pt", help="the diffusion model (model.pt) to evaluate")
    p.add_argument("--autoencoder_ckpt", default="models/model_autoencoder.pt", help="the autoencoder it was trained with")
    p.add_argument("--feature_ckpt", default="models/model_features.pt", help="the autoencoder whose encoder gives the features")
    p.add_argument("--train_dir", required=True, help="the volumes the model was trained on (folder or datalist JSON)")
    p.add_argument("--val_dir", required=True, help="held-out volumes of the same kinds (folder or datalist JSON)")
    p.add_argument("--output_dir", default="eval/generation", help="where generation.json/.md, the grids and the samples go")
    p.add_argument("--num_samples", type=int, default=8, help="samples per class")
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cuda:0, cpu, ...; default: the first GPU if there is one")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.num_samples < 2:
        p.error(f"--num_samples is {args.num_samples}; at least 2 are needed to measure diversity.")
    if len(list_volumes(args.train_dir)) < 2:
        p.error(f"--train_dir '{args.train_dir}' holds fewer than 2 volumes; 2 or more are needed to measure how near a sample may come.")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()):
        p.error(f"--output_dir '{out}' is not empty; give a new folder, so that no earlier result is overwritten.")
    out.mkdir(parents=True, exist_ok=True)
    results = evaluate(args)
    write_atomic(out / "generation.json", json.dumps(results, indent=1) + "\n")
    write_atomic(out / "generation.md", markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
