"""Loss curves as a PNG artifact, drawn from the run's own metric history (so restarts and resumes are included)."""
from __future__ import annotations

import pathlib


def plot_curves(histories: dict[str, list[tuple[int, float]]], path: str | pathlib.Path) -> pathlib.Path:
    """One panel per metric (step on x); metrics without points are left out."""
    import matplotlib
    matplotlib.use("Agg")  # no display on workers
    import matplotlib.pyplot as plt
    series = {k: sorted(v) for k, v in histories.items() if v}
    fig, axes = plt.subplots(len(series), 1, figsize=(6, 2.2 * max(1, len(series))), squeeze=False)
    for ax, (key, points) in zip(axes[:, 0], series.items()):
        ax.plot([s for s, _ in points], [v for _, v in points], marker="." if len(points) < 30 else None)
        ax.set_ylabel(key, fontsize=8)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
