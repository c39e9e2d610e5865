"""Tables and the budget curve from memory-experiment results (the JSON files research.memory_experiment writes).

    python -m research.memory_report outputs/experiments/*.json                      # a Markdown table, one row per run
    python -m research.memory_report --curve docs/memory-curve.png outputs/experiments/curve-*.json
    python -m research.memory_report --chain-curve docs/figures/chain-curve.png outputs/experiments/r1-*.json

The chain curve plots each run's chain -ELBO against the number of images already in memory (the Generative
Matching Networks plot): the memory helps exactly where its line lies below the no-memory run's.

The curve plots the memory-conditional -ELBO (solid) and IWAE (dashed) against training steps, one line per
memory writer, so the K++ advantage over its no-memory control can be read at every budget.
"""
from __future__ import annotations

import argparse
import json
import pathlib
from collections import defaultdict

from kpp.objective import keys_at_floor


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        record = json.loads(pathlib.Path(path).read_text())
        record["path"] = path
        records.append(record)
    return records


def row(record: dict) -> str:
    t, m, tc = record["test"], record["model_config"], record["train_config"]
    keys = sum(1 for k in t if k.startswith("kl_y_key"))  # K reads for K++, 1 for DKM's w, none for the VAE
    per_key = " / ".join(f"{t[f'kl_y_key{k}']:.2f}" for k in range(keys)) or "-"
    idle = record.get("keys_at_floor")
    if idle is None and record.get("history"):  # results written before the field existed: from the history
        after = [r for r in record["history"] if r["step"] > m["objective"]["kl_warmup_steps"]] or record["history"]
        peaks = [max(r["kl_y_per_key"][k] for r in after) for k in range(keys)]
        idle = keys_at_floor(peaks, m["objective"]["key_free_bits"])
    cells = [
        record["name"], m["memory"]["writer"], f"{tc['steps']} x {tc['batch_size']}",
        f"{t.get('chain_neg_elbo', float('nan')):.2f}", f"{t.get('chain_iwae', float('nan')):.2f}",
        f"{t['neg_elbo']:.2f}", f"{t['iwae']:.2f}", f"{t['recon']:.2f}", f"{t['kl_z']:.2f}",
        f"{t['kl_y']:.2f} ({per_key})", f"{t['swap_gap']:+.2f}", f"{t.get('loo_neg_elbo', float('nan')):.2f}",
        f"{t.get('loo_iwae', float('nan')):.2f}",
        "-" if idle is None else (",".join(map(str, idle)) or "none"), f"{record['train_seconds'] / 60:.0f}",
    ]
    return "| " + " | ".join(cells) + " |"


HEADER = ("| run | writer | steps x episodes | chain -ELBO | chain IWAE | memory-cond. -ELBO | memory-cond. IWAE | recon "
          "| KL_z | KL_y (per key) | swap gap | LOO -ELBO | LOO IWAE | idle keys | train min |\n|" + " --- |" * 15)


def table(records: list[dict]) -> str:
    return "\n".join([HEADER, *(row(r) for r in records)])


def _save(fig, ax, out: str, legend_size: int) -> str:
    """Grid, legend and layout of a report figure, written to `out` (its folder made)."""
    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_curve(records: list[dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for r in records:
        label = {"key": "K++ (key writer)", "none": "no memory (writer=none)"}.get(r["model_config"]["memory"]["writer"],
                                                                               r["model_config"]["memory"]["writer"])
        lines[label].append((r["train_config"]["steps"], r["test"]["neg_elbo"], r["test"]["iwae"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for (label, points), colour in zip(sorted(lines.items()), ("tab:blue", "tab:orange", "tab:green")):
        points.sort()
        steps = [p[0] for p in points]
        ax.plot(steps, [p[1] for p in points], "o-", color=colour, label=f"{label}: -ELBO")
        ax.plot(steps, [p[2] for p in points], "s--", color=colour, alpha=0.7, label=f"{label}: IWAE")
        for s, e, _ in points:
            ax.annotate(f"{e:.1f}", (s, e), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
    images = {r["test_images"] for r in records}
    ax.set_xlabel("training steps (16 episodes x 16 images each)")
    ax.set_ylabel("test bound, nats/image (lower is better)")
    reads = "/".join(map(str, sorted({r["model_config"]["keys"]["num_reads"] for r in records})))
    devices = "/".join(sorted({r.get("device_name") or r.get("device", "cpu") for r in records}))
    ax.set_title(f"Binarized MNIST, memory-conditional bounds on {'/'.join(map(str, sorted(images)))} test images\n"
                 f"K = {reads} reads, trained on {devices}", fontsize=10)
    return _save(fig, ax, out, legend_size=8)


def plot_memory_samples(model, episodes, out: str, labels=None, seed: int = 0) -> str:
    """For each test episode [E, T, C, H, W]: the episode, then samples drawn from the memory written from it
    (keys from the prior, z from p(z | reads)). Row labels say which is which."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from kpp import generate as gen

    g = torch.Generator().manual_seed(seed)
    rows, names = [], []
    with torch.no_grad():
        model.eval()
        for i, episode in enumerate(episodes):
            t = episode.shape[0]
            tag = f"episode {i}" + ("" if labels is None else f" (class {int(labels[i])})")
            memory = gen.episode_memory(model, episode[None])
            rows += [episode, gen.generate(model, memory, t, g)[0]]
            names += [tag, "from its memory"]
    n, t = len(rows), rows[0].shape[0]
    fig, axes = plt.subplots(n, t, figsize=(t * 0.55 + 1.8, n * 0.6 + 0.6), dpi=110, squeeze=False)
    for r, (images, name) in enumerate(zip(rows, names)):
        for c in range(t):
            ax = axes[r][c]
            ax.imshow(images[c].permute(1, 2, 0).squeeze(-1).clamp(0, 1).numpy(), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.suptitle("Test episodes, each followed by images generated from the memory it wrote\n(keys from the prior, "
                 "z from p(z | reads), pixel means of the decoder)", fontsize=9)
    fig.tight_layout()
    pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def plot_chain_curve(records: list[dict], out: str) -> str:
    """Chain -ELBO (solid) and IWAE (dashed) against the images already in memory, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for r, colour in zip(records, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")):
        t = r["test"]
        n = list(range(len(t["chain_curve"])))
        label = f"{r['name']} (writer={r['model_config']['memory']['writer']}; mean {t['chain_neg_elbo']:.2f})"
        ax.plot(n, t["chain_curve"], "o-", color=colour, label=f"{label}: -ELBO")
        ax.plot(n, t["chain_iwae_curve"], "s--", color=colour, alpha=0.6, label="  IWAE")
    units = {r["test"]["unit"] for r in records}
    images = "/".join(map(str, sorted({r["test_images"] for r in records})))
    episodes = "/".join(sorted({r.get("episodes", "random") for r in records}))
    steps = "/".join(map(str, sorted({r["train_config"]["steps"] for r in records})))
    ax.set_xlabel("images of the episode already in memory (n: image n + 1 is scored)")
    ax.set_ylabel(f"chain bound, {'/'.join(units)} (lower is better)")
    ax.set_title(f"{'/'.join(sorted({r['dataset'] for r in records}))}, {episodes} episodes, {images} test images, "
                 f"{steps} steps", fontsize=10)
    return _save(fig, ax, out, legend_size=7)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="JSON files written by research.memory_experiment")
    ap.add_argument("--curve", help="also plot -ELBO and IWAE against steps per writer into this PNG")
    ap.add_argument("--chain-curve", help="also plot each run's chain bound against the images in memory into this PNG")
    args = ap.parse_args(argv)
    records = load(args.results)
    print(table(records))
    if args.curve:
        print(f"\ncurve: {plot_curve(records, args.curve)}")
    if args.chain_curve:
        print(f"\nchain curve: {plot_chain_curve(records, args.chain_curve)}")


if __name__ == "__main__":
    main()
