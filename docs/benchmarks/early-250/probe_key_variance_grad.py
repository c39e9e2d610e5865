"""Probe: what moves the keys' posterior log-variance at the start of training, term by term.

The keys' log-variance is the bias (and weights) of the logvar half of `key_posterior`. Only two terms of the
training loss depend on the keys: KL_z (the prior reads at y) and the key KL (with free bits: no gradient while a
key's batch-mean KL is under the floor). For N batches of real binarized-MNIST episodes at initialisation, this
prints the gradient of each term on the mean key log-variance bias: its mean over batches, its spread, and how
often it points the same way. Adam moves a parameter by about lr per step whatever the gradient's size, so a
small but consistent gradient (the key KL times a small warm-up beta) moves the keys as fast as a large one.
From the repository root:

    PYTHONPATH=. python docs/benchmarks/early-250/probe_key_variance_grad.py [--init-logvar -2] [--batches 10]
"""
import argparse
import statistics

import torch

from kpp import KanervaPlusPlus
from kpp.config import KanervaConfig
from kpp.data import to_model_input
from kpp.model import KEY_DIM
from pipeline.data.sources import load_split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--init-logvar", type=float, default=-2.0)
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--source", default="../shared/data/binarized_mnist")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = KanervaConfig.from_dict({"keys": {"init_logvar": args.init_logvar}})
    model = KanervaPlusPlus(cfg)
    images = load_split("binarized_mnist", args.source, "train").images
    k = cfg.keys.num_reads
    bias = model.key_posterior.bias
    rows = {}
    for i in range(args.batches):
        idx = torch.randperm(len(images), generator=torch.Generator().manual_seed(i))[: 16 * cfg.episode_length]
        x = to_model_input(images[idx.numpy()].reshape(16, cfg.episode_length, *images.shape[1:]), cfg.bit_depth)
        terms = model.terms(x)
        kl_y = terms["kl_y_per_key"].flatten(0, 1).mean(0)
        penalised = torch.clamp(kl_y, min=cfg.objective.key_free_bits).sum()
        for name, value in (("KL_z", terms["kl_z"].mean()), ("key KL (free bits)", penalised)):
            grad, = torch.autograd.grad(value, bias, retain_graph=True, allow_unused=True)
            g = grad.view(k, 2, KEY_DIM)[:, 1].mean().item() if grad is not None else 0.0
            rows.setdefault(name, []).append(g)
        rows.setdefault("key KL per key", []).append(kl_y.mean().item())
    print(f"key init log-variance {args.init_logvar}, {args.batches} batches of 16 x {cfg.episode_length} images")
    print(f"key KL per key at init: {statistics.mean(rows.pop('key KL per key')):.3f} nats")
    for name, values in rows.items():
        same = max(sum(v > 0 for v in values), sum(v < 0 for v in values))
        print(f"d {name:18s} / d logvar: mean {statistics.mean(values):+.4f}, std {statistics.pstdev(values):.4f}, "
              f"same sign in {same}/{len(values)} (negative: descent widens the keys)")


if __name__ == "__main__":
    main()
