"""Loss curves as a PNG artifact, drawn from the run's own metric history (so restarts and resumes are included), and
the chain curve of a test evaluation."""
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


def plot_chain_curve(curve: list[float], iwae_curve: list[float], unit: str, iwae_samples: int, title: str,
                     path: str | pathlib.Path) -> pathlib.Path:
    """The chain bound against the number of images already in memory (kpp.evaluate's chain_curve: entry n is the
    mean bound of the images scored under a memory of the n images before them), -ELBO and IWAE, the mean over the
    episode as a dashed line: what Generative Matching Networks plot. A memory that predicts makes it fall."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = list(range(len(curve)))
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(n, curve, marker="o", label="chain -ELBO")
    ax.plot(n, iwae_curve, marker=".", label=f"chain IWAE bound (S={iwae_samples})")
    mean = sum(curve) / len(curve)
    ax.axhline(mean, color="0.5", linestyle="--", linewidth=1,
               label=f"mean over the episode: {mean:.2f} (bounds -ln p(X)/T)")
    ax.set_xlabel("images already in memory (n earlier images of the episode)")
    ax.set_ylabel(f"chain -ELBO ({unit})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
