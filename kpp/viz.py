"""A PNG grid of what the model does with an episode: the episode, its reconstructions, conditional samples,
key-perturbed samples, iterative inference rounds and unconditional samples. One row each, T columns."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from kpp import generate as gen
from kpp.model import KanervaPlusPlus

ROW_LABELS = ["episode", "reconstruction", "conditional", "key-perturbed", "iterative 1", "iterative 2",
              "iterative 3", "unconditional"]


@torch.no_grad()
def sample_rows(model: KanervaPlusPlus, episode: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    """episode [1, T, C, H, W] -> rows [T, C, H, W] in [0, 1], in ROW_LABELS order."""
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    episode = episode.to(device)
    t = episode.shape[1]
    enc = model.encode(episode)
    memory = model.write(enc)
    recon = model.likelihood.mean(model.decode(enc.z_mean)).view(1, t, *model.cfg.image_shape)
    keys = gen.prior_keys(model, 1, t, g)
    conditional = gen.generate(model, memory, t, g, keys=keys)
    perturbed = gen.generate(model, memory, t, g, keys=gen.perturb_keys(keys, 0.1, g))
    rounds = gen.iterative_inference(model, memory, conditional, rounds=3, generator=g)
    unconditional = gen.generate(model, gen.empty_memory(model, 1), t, g)
    model.train(was_training)
    return [r[0].cpu() for r in [episode, recon, conditional, perturbed, *rounds, unconditional]]


def save_sample_grid(model: KanervaPlusPlus, episode: torch.Tensor, path: str | os.PathLike, seed: int = 0,
                     scale: int = 2) -> str:
    rows = sample_rows(model, episode, seed)
    c, h, w = rows[0].shape[1:]
    pad = 2
    t = rows[0].shape[0]
    canvas = np.ones(((h + pad) * len(rows) + pad, (w + pad) * t + pad, c), dtype=np.float32)
    for i, row in enumerate(rows):
        for j in range(t):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0 : y0 + h, x0 : x0 + w] = row[j].permute(1, 2, 0).clamp(0, 1).numpy()
    pixels = (canvas * 255).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if c == 1 else pixels)
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image.save(path)
    return str(path)


# -- labelled figures (matplotlib): what jobs.generate / jobs.inspect write and training logs -------------------
# Binary images are ink = 1: drawn dark on white. Every figure has a title, row labels and column labels.
CMAP = "gray_r"
MAX_CHANNEL_MAPS = 8  # the memory figure's channel maps: one row


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)  # no pyplot: no global state, safe on Ray workers and in threads
    return fig


def save_figure(fig, path: str | os.PathLike) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi, facecolor="white")
    return str(path)


def figure_array(fig) -> np.ndarray:
    """The rendered figure as uint8 RGB [H, W, 3] (what mlflow.log_image takes)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def tile(rows: list[torch.Tensor], pad: int = 2) -> tuple[np.ndarray, int, int]:
    """Rows of images [N_i, C, H, W] in [0, 1] -> one canvas [rows*(H+pad)+pad, N*(W+pad)+pad, C] (pad = 1.0 for
    ink images is white; a missing cell is left blank), and the cell size (H, W)."""
    c, h, w = rows[0].shape[1:]
    n = max(r.shape[0] for r in rows)
    fill = 0.15 if c == 1 else 0.85  # light grey lines between cells
    canvas = np.full(((h + pad) * len(rows) + pad, (w + pad) * n + pad, c), fill, dtype=np.float32)
    for i, row in enumerate(rows):
        for j in range(row.shape[0]):
            y0, x0 = pad + i * (h + pad), pad + j * (w + pad)
            canvas[y0: y0 + h, x0: x0 + w] = row[j].detach().float().permute(1, 2, 0).clamp(0, 1).cpu().numpy()
    return canvas, h, w


def image_grid_figure(rows: list[torch.Tensor], row_labels: list[str], title: str,
                      col_labels: list[str] | None = None, note: str = "", pixel_scale: float = 2.0):
    """One labelled grid: row i is rows[i] ([N, C, H, W]) with row_labels[i] at its left, columns labelled."""
    canvas, h, w = tile(rows)
    pad = 2
    ncols = (canvas.shape[1] - pad) // (w + pad)
    label_in = 0.08 * max(len(s) for s in row_labels) + 0.3
    img_w, img_h = canvas.shape[1] * pixel_scale / 100, canvas.shape[0] * pixel_scale / 100
    top_in = 0.55 + (0.2 if note else 0.0)
    fig = _figure(img_w + label_in + 0.2, img_h + top_in + 0.35)
    ax = fig.add_axes([label_in / fig.get_figwidth(), 0.35 / fig.get_figheight(),
                       img_w / fig.get_figwidth(), img_h / fig.get_figheight()])
    if canvas.shape[2] == 1:
        ax.imshow(canvas[..., 0], cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    else:
        ax.imshow(canvas, interpolation="nearest")
    ax.set_yticks([pad + i * (h + pad) + h / 2 - 0.5 for i in range(len(rows))], row_labels, fontsize=8)
    labels = col_labels if col_labels is not None else [f"t={j + 1}" for j in range(ncols)]
    ax.set_xticks([pad + j * (w + pad) + w / 2 - 0.5 for j in range(len(labels))], labels, fontsize=7)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    fig.suptitle(title, fontsize=10, y=1 - 0.12 / fig.get_figheight(), va="top")
    fig.kpp_grid = {"rows": len(rows), "cols": ncols, "row_labels": list(row_labels), "cell": [h, w]}
    if note:
        fig.text(0.5, 1 - 0.42 / fig.get_figheight(), note, ha="center", va="top", fontsize=7.5, color="0.3")
    return fig


def _eval(model: KanervaPlusPlus, episode: torch.Tensor | None):
    device = next(model.parameters()).device
    return device, (None if episode is None else episode.to(device))


def _in_eval_mode(draw):
    """Run a figure function with the model in eval mode and no gradients, then restore its mode (the training
    loop draws mid-run)."""
    import functools

    @functools.wraps(draw)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return draw(model, *args, **kwargs)
        finally:
            model.train(was_training)
    return wrapper


@_in_eval_mode
def labelled_sample_figure(model: KanervaPlusPlus, episode: torch.Tensor, seed: int = 0, step: int | None = None):
    """The training grid, labelled: an episode [1, T, C, H, W], its reconstructions, the memory read back at its
    keys, samples with prior keys from its memory, the same keys perturbed (same z draw), iterative inference
    rounds from those samples, and samples from the empty memory."""
    device, episode = _eval(model, episode)
    where = f" at step {step}" if step is not None else ""
    if model.cfg.kind != "kpp":  # the baselines have no keys to sample or perturb: what they reconstruct
        rows, labels = [episode, gen.reconstruct(model, episode)], ["episode", "reconstruction"]
        return image_grid_figure([r[0].cpu() for r in rows], labels,
                                 f"One test episode{where} ({model.cfg.kind} baseline)")
    g = torch.Generator().manual_seed(seed)
    t = episode.shape[1]
    memory = gen.episode_memory(model, episode)
    keys = gen.prior_keys(model, 1, t, g)
    noise = gen.z_noise(model, 1, t, g)
    base, perturbed = gen.key_perturbation(model, memory, keys, rows=1, std=0.1, generator=g, noise=noise)
    rounds = gen.iterative_inference(model, memory, base, rounds=3, generator=g)
    unconditional = gen.generate(model, gen.empty_memory(model, 1), t, g)
    rows = [episode, gen.reconstruct(model, episode), gen.read_back(model, episode), base, perturbed, *rounds,
            unconditional]
    labels = ["episode", "reconstruction", "read back at own keys", "sample: y ~ p(y), own M",
              "same, y + N(0, 0.01 I)", "iterative round 1", "iterative round 2", "iterative round 3",
              "sample: empty M"]
    return image_grid_figure([r[0].cpu() for r in rows], labels, f"One test episode and what the model makes of it{where}")


@_in_eval_mode
def prior_samples_figure(model: KanervaPlusPlus, episode: torch.Tensor | None = None, rows: int = 4, seed: int = 0):
    """(a) Samples with keys y ~ p(y) = N(0, I) and z ~ p(z | M_hat, y): from the empty memory (unconditional)
    and, given an episode [1, T, C, H, W], from the memory written from it."""
    device, episode = _eval(model, episode)
    g = torch.Generator().manual_seed(seed)
    t = model.cfg.episode_length
    out, labels = [], []
    empty = gen.empty_memory(model, 1)
    for i in range(rows):
        out.append(gen.generate(model, empty, t, g)[0])
        labels.append(f"empty memory, draw {i + 1}")
    if episode is not None:
        memory = gen.episode_memory(model, episode)
        out.insert(0, episode[0])
        labels.insert(0, "episode (writes M)")
        for i in range(rows):
            out.append(gen.generate(model, memory, t, g)[0])
            labels.append(f"episode's M, draw {i + 1}")
    return image_grid_figure([r.cpu() for r in out], labels, "Samples with keys from the prior y ~ N(0, I)",
                             col_labels=[f"{j + 1}" for j in range(t)],
                             note="each image: y ~ p(y), read M at y, z ~ p(z | reads), decoded mean")


@_in_eval_mode
def conditional_figure(model: KanervaPlusPlus, episode: torch.Tensor, samples: int = 3, seed: int = 0):
    """(b) An episode beside what its memory gives: reconstructions, the memory read back at each image's own keys,
    and samples with prior keys from the episode's memory."""
    device, episode = _eval(model, episode)
    g = torch.Generator().manual_seed(seed)
    t = episode.shape[1]
    memory = gen.episode_memory(model, episode)
    rows = [episode[0], gen.reconstruct(model, episode)[0], gen.read_back(model, episode)[0]]
    labels = ["episode x_t", "reconstruction (q(z|X) mean)", "read back at own keys"]
    for i in range(samples):
        rows.append(gen.generate(model, memory, t, g)[0])
        labels.append(f"sample from M, draw {i + 1}")
    return image_grid_figure([r.cpu() for r in rows], labels, "Generation conditioned on an episode's memory",
                             note="read back: M read at q(y|X)'s mean, z = prior mean; samples: y ~ p(y), z ~ p(z | reads)")


@_in_eval_mode
def key_perturbation_figure(model: KanervaPlusPlus, episode: torch.Tensor, rows: int = 5, std: float = 0.1,
                            seed: int = 0):
    """(c) Images at the episode's key means y (first row) and at y + eps, eps ~ N(0, std^2 I), same z draw."""
    device, episode = _eval(model, episode)
    g = torch.Generator().manual_seed(seed)
    enc = model.encode(episode)
    memory = model.write(enc)
    grid = gen.key_perturbation(model, memory, enc.key_mean, rows=rows, std=std, generator=g)[:, 0]
    labels = ["keys y (q(y|X) mean)"] + [f"y + eps, draw {i + 1}" for i in range(rows)]
    return image_grid_figure([episode[0].cpu()] + [r.cpu() for r in grid], ["episode x_t"] + labels,
                             f"Key perturbation: y + eps, eps ~ N(0, {std ** 2:g} I)",
                             note="same memory, same z draw in every row: only the keys move")


@_in_eval_mode
def iterative_inference_figure(model: KanervaPlusPlus, episode: torch.Tensor, rounds: int = 3, seed: int = 0):
    """(d) Iterative inference: start from samples with prior keys, then re-encode, re-read and decode each
    round with the episode's memory fixed."""
    device, episode = _eval(model, episode)
    g = torch.Generator().manual_seed(seed)
    memory = gen.episode_memory(model, episode)
    start = gen.generate(model, memory, episode.shape[1], g)
    steps = gen.iterative_inference(model, memory, start, rounds=rounds, generator=g)
    rows = [episode[0], start[0], *[s[0] for s in steps]]
    labels = ["episode (writes M)", "round 0: y ~ p(y)"] + [f"round {i + 1}" for i in range(rounds)]
    return image_grid_figure([r.cpu() for r in rows], labels, f"Iterative inference, {rounds} rounds",
                             note="each round: y = q(y | previous row) mean, read the episode's M, z ~ p(z | reads), decode")


def key_boxes(model: KanervaPlusPlus, keys: torch.Tensor) -> torch.Tensor:
    """Keys [..., 3] -> the memory region each read covers, in memory pixel coordinates (x0, y0, x1, y1) as
    imshow draws them (pixel centres at integers)."""
    from kpp.memory import key_to_affine
    theta = key_to_affine(keys, model.cfg.keys.min_scale, model.cfg.keys.max_scale)
    s, tx, ty = theta[..., 0, 0], theta[..., 0, 2], theta[..., 1, 2]
    h, w = model.cfg.memory.height, model.cfg.memory.width
    return torch.stack([(tx - s + 1) / 2 * w - 0.5, (ty - s + 1) / 2 * h - 0.5,
                        (tx + s + 1) / 2 * w - 0.5, (ty + s + 1) / 2 * h - 0.5], -1)


def _colours(n: int):
    import matplotlib
    cmap = matplotlib.colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _show_image(ax, image: torch.Tensor) -> None:
    img = image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy()
    ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _draw_boxes(ax, boxes: torch.Tensor, colour, styles, lw: float, alpha: float = 1.0) -> None:
    """boxes [K, 4] (x0, y0, x1, y1), read k in line style styles[k]."""
    from matplotlib.patches import Rectangle
    for k, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
        ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, lw=lw, alpha=alpha, color=colour,
                               ls=styles[k % len(styles)]))


def _memory_panel(ax, heat: np.ndarray, margin: float = 0.2) -> None:
    from matplotlib.patches import Rectangle
    h, w = heat.shape
    ax.imshow(heat, cmap="Greys", interpolation="nearest", vmin=0)
    ax.set_xlim(-0.5 - margin * w, w - 0.5 + margin * w)
    ax.set_ylim(h - 0.5 + margin * h, -0.5 - margin * h)
    ax.add_patch(Rectangle((-0.5, -0.5), w, h, fill=False, lw=0.8, color="black"))


@_in_eval_mode
def memory_keys_figure(model: KanervaPlusPlus, episode: torch.Tensor, seed: int = 0, samples: int = 4,
                       title: str = "Memory written from one episode, and where its keys read"):
    """The memory channels as heatmaps (M, and M minus the empty memory: what the episode wrote), and the episode's
    key posteriors q(y_tk | X) drawn as read boxes (side = scale, centre = shift) on |M - empty M|: all images
    together, then image by image beside the image; thick at the posterior mean, thin at draws from q; one colour
    per image, one line style per read."""
    device, episode = _eval(model, episode)
    if model.cfg.kind != "kpp":
        raise ValueError(f"the memory/keys figure needs the K++ memory; memory.writer={model.cfg.memory.writer} "
                         f"has no 2-D memory map and keys")
    enc = model.encode(episode)
    memory = model.write(enc)[0].cpu()
    if memory.dim() != 3:
        raise ValueError(f"the memory/keys figure needs a 2-D memory map [C, H, W], got {list(memory.shape)}")
    written = memory - gen.empty_memory(model, 1)[0].cpu()
    heat = written.norm(dim=0).numpy()
    # at most one row of channel maps: the code memory has 2 d_z + 1 channels (its code, then the writes'
    # coverage), so it shows its first 7 code channels and the coverage
    channels = list(range(memory.shape[0]))
    labels = [f"ch {ch}" for ch in channels]
    if len(channels) > MAX_CHANNEL_MAPS:
        coverage = model.cfg.memory.content == "code"
        channels = channels[: MAX_CHANNEL_MAPS - coverage] + channels[-1:] * coverage
        labels = [f"ch {ch}" for ch in channels[: MAX_CHANNEL_MAPS - coverage]] + ["coverage"] * coverage
    c = len(channels)
    t, k = enc.key_mean.shape[1], enc.key_mean.shape[2]
    g = torch.Generator().manual_seed(seed)
    means = key_boxes(model, enc.key_mean[0].cpu())  # [T, K, 4]
    draws = enc.key_mean[0].cpu() + torch.exp(0.5 * enc.key_logvar[0].cpu()) * torch.randn(samples, t, k, 3, generator=g)
    drawn = key_boxes(model, draws)  # [S, T, K, 4]
    cols = 8
    chan_rows = -(-c // cols)
    img_rows = -(-t // cols)
    heights = [1.0] * (2 * chan_rows) + [2.9] + [1.0, 0.9] * img_rows
    fig = _figure(1.2 * cols + 0.4, sum(heights) * 1.05 + 1.0)
    gs = fig.add_gridspec(len(heights), cols, height_ratios=heights, left=0.06, right=0.97, top=1 - 0.6 / fig.get_figheight(),
                          bottom=0.35 / (sum(heights) * 1.05 + 1.0), hspace=0.45, wspace=0.2)
    for r, (maps, name) in enumerate(((memory, "M"), (written, "M - empty M"))):
        lim = float(maps[channels].abs().max()) or 1.0
        for i, (ch, label) in enumerate(zip(channels, labels)):
            ax = fig.add_subplot(gs[r * chan_rows + i // cols, i % cols])
            im = ax.imshow(maps[ch].numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{name}, {label}", fontsize=6.5, pad=2)
        cax = ax.inset_axes([1.04, 0.0, 0.06, 1.0])
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=5.5)
    colours = _colours(t)
    styles = ["-", "--", ":", "-."]
    row = 2 * chan_rows
    ax = fig.add_subplot(gs[row, 1:4])
    ax.set_anchor("N")
    _memory_panel(ax, heat)
    for ti in range(t):
        for si in range(samples):
            _draw_boxes(ax, drawn[si, ti], colours[ti], styles, lw=0.5, alpha=0.35)
        _draw_boxes(ax, means[ti], colours[ti], styles, lw=1.8)
    ax.set_title("all images: key posteriors as read boxes on |M - empty M| (grey)", fontsize=8)
    ax.set_xlabel("memory column  (t_x = -1 ... +1)", fontsize=7)
    ax.set_ylabel("memory row  (t_y = -1 ... +1)", fontsize=7)
    ax.tick_params(labelsize=6)
    text = fig.add_subplot(gs[row, 4:])
    text.axis("off")
    names = ["solid", "dashed", "dotted", "dash-dot"]
    text.text(0.0, 0.9, "\n".join([f"{t} images x {k} reads per image",
                                   "thick box: mean of q(y | X)", f"thin boxes: {samples} draws from q(y | X)",
                                   *[f"read {ki}: {names[ki % 4]} line" for ki in range(k)],
                                   "box side: read scale s (a fraction of the memory side)",
                                   "box centre: read shift (t_x, t_y)", "colour: the image (below)"]),
              fontsize=7.5, va="top")
    for ti in range(t):
        r0 = row + 1 + 2 * (ti // cols)
        ax = fig.add_subplot(gs[r0, ti % cols])
        _memory_panel(ax, heat, margin=0.1)
        for si in range(samples):
            _draw_boxes(ax, drawn[si, ti], colours[ti], styles, lw=0.5, alpha=0.5)
        _draw_boxes(ax, means[ti], colours[ti], styles, lw=1.5)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"reads of x_{ti + 1}", fontsize=7, color=colours[ti], pad=2)
        ax = fig.add_subplot(gs[r0 + 1, ti % cols])
        _show_image(ax, episode[0, ti])
        for spine in ax.spines.values():
            spine.set_color(colours[ti])
            spine.set_linewidth(2.0)
        ax.set_xlabel(f"x_{ti + 1}", fontsize=7, color=colours[ti], labelpad=1)
    fig.suptitle(title, fontsize=10, y=1 - 0.15 / fig.get_figheight(), va="top")
    fig.kpp_grid = {"channels": c, "images": t, "reads": k}
    return fig


@_in_eval_mode
def key_sweep_figure(model: KanervaPlusPlus, episode: torch.Tensor, scales: tuple[float, ...] | None = None,
                     n: int = 7, read: int | None = None):
    """What each region of the 3-D key space decodes to, from the episode's memory: one panel per read scale s,
    an n x n grid of read centres (t_x, t_y) in each (z = prior mean)."""
    device, episode = _eval(model, episode)
    enc = model.encode(episode)
    memory = model.write(enc)
    lo, hi = model.cfg.keys.min_scale, model.cfg.keys.max_scale
    scales = scales or (lo + 0.1 * (hi - lo), (lo + hi) / 2, hi - 0.1 * (hi - lo))
    positions = np.round(np.linspace(-0.9, 0.9, n), 2).tolist()
    base = enc.key_mean[0].mean(0) if read is not None else None
    grids = gen.key_sweep(model, memory, list(scales), positions, base_keys=base, read=read).cpu()
    c, h, w = model.cfg.image_shape
    pad = 1
    fig = _figure(3.3 * len(scales) + 0.4, 3.9)
    for i, s in enumerate(scales):
        canvas, _, _ = tile([grids[i, r] for r in range(n)], pad=pad)
        ax = fig.add_subplot(1, len(scales), i + 1)
        ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap=CMAP, vmin=0, vmax=1, interpolation="nearest")
        centres = [pad + j * (w + pad) + w / 2 - 0.5 for j in range(n)]
        ticks = ["0" if abs(p) < 1e-9 else f"{p:+.2g}" for p in positions]
        ax.set_xticks(centres, ticks, fontsize=6)
        ax.set_yticks([pad + j * (h + pad) + h / 2 - 0.5 for j in range(n)], ticks, fontsize=6)
        ax.tick_params(length=0)
        ax.set_xlabel("read centre t_x", fontsize=8)
        if i == 0:
            ax.set_ylabel("read centre t_y", fontsize=8)
        ax.set_title(f"read scale s = {s:.2f} of the memory side", fontsize=8)
    which = "all reads" if read is None else f"read {read} (others at the episode's mean keys)"
    fig.suptitle(f"Key space sweep: what the episode's memory decodes to when {which} move to (s, t_x, t_y)",
                 fontsize=9.5)
    fig.subplots_adjust(left=0.06, right=0.99, top=0.86, bottom=0.12, wspace=0.12)
    fig.kpp_grid = {"panels": len(scales), "rows": n, "cols": n, "scales": [float(s) for s in scales],
                    "positions": positions}
    return fig
