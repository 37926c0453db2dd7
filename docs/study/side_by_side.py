"""Put the sample grids of several diffusion models (the grid_CLASS.png files that
scripts.evaluate_generation writes) side by side in one figure, each under its label.

    python docs/study/side_by_side.py OUT.png "TITLE" [--columns N] GRID.png "LABEL" [GRID.png "LABEL" ...]

With --columns N the grids fill rows of N (default: all in one row).
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, title: str, *pairs: str) -> None:
    columns = None
    if pairs[0] == "--columns":
        columns, pairs = int(pairs[1]), pairs[2:]
    grids, labels = pairs[0::2], pairs[1::2]
    columns = columns or len(grids)
    rows = -(-len(grids) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.6 * columns, 5.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, grid, label in zip(axes.flat, grids, labels):
        ax.imshow(plt.imread(grid))
        ax.set_title(label, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=80)


if __name__ == "__main__":
    main(*sys.argv[1:])
