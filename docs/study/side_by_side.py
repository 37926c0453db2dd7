"""Put the sample grids of several diffusion models (the grid_CLASS.png files that
scripts.evaluate_generation writes) side by side in one figure, each under its label.

    python docs/study/side_by_side.py OUT.png "TITLE" GRID.png "LABEL" [GRID.png "LABEL" ...]
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, title: str, *pairs: str) -> None:
    grids, labels = pairs[0::2], pairs[1::2]
    fig, axes = plt.subplots(1, len(grids), figsize=(3.6 * len(grids), 5.2))
    for ax, grid, label in zip(axes, grids, labels):
        ax.imshow(plt.imread(grid))
        ax.set_title(label, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:])
