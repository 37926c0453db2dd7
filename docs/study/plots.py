"""Redraw the figures of docs/quality.md from the stage curves in this folder.

    python docs/study/plots.py
"""

from __future__ import annotations

import csv
from pathlib import Path

from curves import plot

HERE = Path(__file__).parent
DOCS = HERE.parent


def load(stage: int, run: str, label: str | None = None, after: list[dict] | None = None) -> list[dict]:
    """One run's curve; ``after``: the curve it continues, whose last iteration and time it adds."""
    it0, s0 = (after[-1]["iteration"], after[-1]["seconds"]) if after else (0, 0.0)
    return [
        {"run": label or run, "iteration": int(r["iteration"]) + it0, "seconds": float(r["seconds"]) + s0, "val_psnr": float(r["val_psnr"])}
        for r in csv.DictReader(open(HERE / f"stage{stage}_curves.csv"))
        if r["run"] == run
    ]


def main() -> None:
    stage1 = [r for run in dict.fromkeys(r["run"] for r in csv.DictReader(open(HERE / "stage1_curves.csv"))) for r in load(1, run)]
    plot(stage1, DOCS / "quality_study.png", "Recipe at equal budget: 4x, 2 x 128x128x64 patches, lr 2e-4, bf16, three runs per H100 (2026-11-27)")
    shortcut = load(5, "s5_4x_base", "4x, no shortcut") + load(5, "s5_4x_lv8", "4x, no shortcut, initial_log_var -8")
    shortcut += load(6, "s6_4x_sc", "4x, shortcut") + load(6, "s6_4x_sc_lr5e-4", "4x, shortcut, lr 5e-4")
    shortcut += load(6, "s6_4x_sc_strided", "4x, shortcut, strided layout")
    shortcut += load(5, "s5_8x_lv8", "8x, no shortcut") + load(6, "s6_8x_sc", "8x, shortcut")
    shortcut += load(5, "s5_16x_lv8", "16x, no shortcut") + load(6, "s6_16x_sc", "16x, shortcut")
    plot(shortcut, DOCS / "quality_shortcut.png", "The latent shortcut, from scratch: two runs per H100, 380 s each (2026-11-27)")
    latent = load(8, "s8_8x_l32", "8x, pool, 32 channels") + load(8, "s8_8x_l128_lr5e-4", "8x, pool, 128")
    latent += load(9, "s9_8x_l64_cos", "8x, cosine, 64") + load(9, "s9_8x_l128_cos", "8x, cosine, 128")
    latent += load(8, "s8_16x_l64", "16x, pool, 64 channels") + load(8, "s8_16x_l1024", "16x, pool, 1024")
    latent += load(9, "s9_16x_l256_cos", "16x, cosine, 256") + load(9, "s9_16x_l1024_cos", "16x, cosine, 1024")
    plot(latent, DOCS / "quality_latent.png", "Latent channels and the shortcut at 8x and 16x, from scratch (pool: lr 2e-4, 8x 128: 5e-4; cosine: 5e-4), two runs per H100 (2026-11-27)")
    four = load(6, "s6_4x_sc_lr5e-4", "4x, 16 latent channels")
    for stage, run in ((7, "s7_4x_const"), (8, "s8_4x_cont"), (9, "s9_4x_pool_decay"), (10, "s10_4x_pool")):
        four += load(stage, run, "4x, 16 latent channels", four)
    eight = load(9, "s9_8x_l128_cos", "8x, 128 latent channels")
    eight += load(10, "s10_8x_cos", "8x, 128 latent channels", eight)
    sixteen = load(11, "s11_16x_c32", "16x, 1024 latent channels")
    wide = load(9, "s9_16x_l1024_cos", "16x, 1024, channels (64, 128, 128)")
    wide += load(10, "s10_16x_cos", "16x, 1024, channels (64, 128, 128)", wide)
    plot(four + eight + sixteen + wide, DOCS / "quality_training.png", "Shipped weights: validation PSNR through the training stages (H100, 2026-11-27)")
    start = [r for run in ("s12_4x_pool", "s12_4x_cos", "s12_4x_cos_lr2e-4", "s12_4x_cos_wide", "s12_8x_cos", "s12_8x_cos_c32") for r in load(12, run)]
    start += load(13, "s13_8x_gain6") + load(13, "s13_8x_fp32")
    plot(start, DOCS / "quality_code_start.png", "Started at the shortcut's code, from scratch: one schedule over two calls, two runs per H100 (2026-11-27)")
    squared = load(14, "s14_4x_pool_mse", "4x pool, squared error")
    squared += load(14, "s14_4x_ft_mse", "4x pool, squared error", squared)  # its second schedule
    mse = load(12, "s12_4x_pool", "4x pool, L1") + squared
    mse += load(14, "s14_4x_pool_mse_quiet", "4x pool, squared error, no noise") + load(14, "s14_4x_cos_mse_quiet_out", "4x cosine, squared error, no noise, slow output")
    mse += load(14, "s14_8x_mse", "8x cosine, squared error") + load(14, "s14_8x_mse_quiet_out", "8x cosine, squared error, no noise, slow output")
    plot(mse, DOCS / "quality_mse.png", "The squared error in place of L1, from the code start: two runs per H100 (2026-11-27)")


if __name__ == "__main__":
    main()
