"""Figures of what a registered model generates, as labelled PNGs.

    python -m jobs.generate --model models:/kpp-digits@champion --out outputs/figures [--episode URL | --random]
                            [--index I] [--rounds N] [--seed S]

Writes, under --out: samples_prior.png (a: keys y ~ p(y), from the empty memory and from the episode's memory),
conditional.png (b: the episode beside its reconstructions, the memory read back at its keys and samples from its
memory), key_perturbation.png (c: images at the episode's keys y and at y + eps, eps ~ N(0, 0.01 I), same z draw),
iterative_inference.png (d: samples refined over N rounds with the memory fixed).
The episode: --episode URL (a prepared dataset: its fixed test episode --index; or a .npy of uint8 [T, C, H, W]),
or --random (default): a random fixed test episode of the data the version was trained on.
The model loads through the tracking server (MLFLOW_TRACKING_URI) only. Exit status: 0 done, 2 bad input (unknown
model or alias, data that does not match the model, tracking server down).
"""
from __future__ import annotations

import argparse
import sys

from pipeline.registry.episode_args import add_episode_arguments


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_arguments(ap)
    ap.add_argument("--out", required=True, help="folder for the PNGs")
    ap.add_argument("--rounds", type=int, default=3, help="iterative inference rounds (default 3)")
    ap.add_argument("--samples", type=int, default=4, help="sample rows per memory (default 4)")
    ap.add_argument("--perturbations", type=int, default=5, help="key-perturbed rows (default 5)")
    ap.add_argument("--std", type=float, default=0.1, help="std of the key perturbation (default 0.1: variance 0.01)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every draw (and of --random)")
    ap.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else jobs.train's store")
    args = ap.parse_args(argv)
    for name in ("rounds", "samples", "perturbations"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.index < 0 or args.std < 0:
        ap.error("--index and --std must be >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.registry import figures, loading
    from pipeline.urls import redact_text
    try:
        reg = loading.load(args.model, args.tracking_uri)
        ep = figures.episode(reg, args.episode, args.index, random=not args.episode, seed=args.seed)
    except loading.RegistryError as e:
        print(f"jobs.generate: {redact_text(str(e))}", file=sys.stderr)
        return 2
    paths = figures.generate(reg, ep, args.out, rounds=args.rounds, samples=args.samples,
                             perturbations=args.perturbations, std=args.std, seed=args.seed)
    figures.report("generate", args, reg, ep, paths)
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
