"""Validation curves of study runs, read from their training logs: a CSV (run, epoch, iteration,
seconds of training, summed over the calls of a resumed run, val_psnr, val_ssim) and, with --png, a
plot against steps and against wall time.

    python docs/study/curves.py RUNS_DIR --csv curves.csv [--png curves.png] [--epoch_length 500]
"""

from __future__ import annotations

import argparse
import csv
import re
from datetime import datetime
from pathlib import Path

STAMP = r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})"
START = re.compile(STAMP + r".*AutoencoderKLTrainer.*Engine run (?:starting|resuming)")
METRICS = re.compile(STAMP + r".*Epoch\[(\d+)\] Metrics -- val_psnr: ([\d.naninf-]+) val_ssim: ([\d.naninf-]+)")


def _time(stamp: str) -> datetime:
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")


def read_curves(runs_dir: Path, epoch_length: int) -> list[dict]:
    rows = []
    for log in sorted(runs_dir.glob("*/log.txt")):
        start, before, seconds = None, 0.0, 0.0  # a run resumed in a later call adds its time to the earlier
        for line in log.read_text(errors="replace").splitlines():
            if m := START.search(line):
                start, before = _time(m.group(1)), seconds
            elif start is not None and (m := METRICS.search(line)):
                seconds = before + (_time(m.group(1)) - start).total_seconds()
                epoch = int(m.group(2))
                rows.append(
                    {
                        "run": log.parent.name,
                        "epoch": epoch,
                        "iteration": epoch * epoch_length,
                        "seconds": round(seconds, 1),
                        "val_psnr": float(m.group(3)),
                        "val_ssim": float(m.group(4)),
                    }
                )
    return rows


def plot(rows: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=80, sharey=True)
    runs = list(dict.fromkeys(r["run"] for r in rows))
    colours = plt.get_cmap("tab20" if len(runs) > 10 else "tab10")
    for i, run in enumerate(runs):
        mine = [r for r in rows if r["run"] == run]
        style = dict(marker=".", color=colours(i), linestyle="-" if i % 2 == 0 else "--")
        axes[0].plot([r["iteration"] for r in mine], [r["val_psnr"] for r in mine], label=run, **style)
        axes[1].plot([r["seconds"] / 60 for r in mine], [r["val_psnr"] for r in mine], **style)
    axes[0].set_xlabel("iterations")
    axes[1].set_xlabel("minutes of training")
    axes[0].set_ylabel("validation PSNR over the body (dB)")
    axes[0].legend(fontsize=7, ncol=2)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("runs_dir", type=Path)
    p.add_argument("--csv", type=Path, required=True)
    p.add_argument("--png", type=Path)
    p.add_argument("--title", default="")
    p.add_argument("--epoch_length", type=int, default=500)
    args = p.parse_args()
    rows = read_curves(args.runs_dir, args.epoch_length)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["run", "epoch", "iteration", "seconds", "val_psnr", "val_ssim"])
        writer.writeheader()
        writer.writerows(rows)
    best = {}
    for r in rows:
        if r["run"] not in best or r["val_psnr"] > best[r["run"]]["val_psnr"]:
            best[r["run"]] = r
    for run, r in sorted(best.items(), key=lambda kv: -kv[1]["val_psnr"]):
        last = max((x for x in rows if x["run"] == run), key=lambda x: x["iteration"])
        print(f"{run:28s} best {r['val_psnr']:.2f} dB at {r['iteration']} (last {last['val_psnr']:.2f} at {last['iteration']}, {last['seconds']:.0f} s)")
    if args.png:
        plot(rows, args.png, args.title)


if __name__ == "__main__":
    main()
