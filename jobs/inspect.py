"""Look inside a registered model's memory for one episode, as labelled PNGs.

    python -m jobs.inspect --model models:/kpp-digits@champion --episode outputs/shards/digits [--index I] --out DIR

Writes, under --out: memory_keys.png (the memory's channels as heatmaps, M and what the episode wrote, and the
episode's key posteriors q(y | X) drawn as read boxes, scale and position, on the memory, image by image) and
key_space.png (a sweep across the 3-D key space: what the episode's memory decodes to when read at each scale and
position). --random instead of --episode: a random test episode of the data the version was trained on.
The model loads through the tracking server (MLFLOW_TRACKING_URI) only. Exit status: 0 done, 2 bad input.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.registry.episode_args import add_episode_arguments


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.inspect", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_episode_arguments(ap)
    ap.add_argument("--out", default="outputs/inspect", help="folder for the PNGs (default outputs/inspect)")
    ap.add_argument("--grid", type=int, default=7, help="read positions per axis in the key sweep (default 7)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the key draws (and of --random)")
    ap.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else jobs.train's store")
    args = ap.parse_args(argv)
    if args.index < 0 or not 2 <= args.grid <= 25:
        ap.error("--index must be >= 0 and --grid in [2, 25]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.registry import figures, loading
    from pipeline.urls import redact_text
    try:
        reg = loading.load(args.model, args.tracking_uri)
        ep = figures.episode(reg, args.episode, args.index, random=not args.episode, seed=args.seed)
        paths = figures.inspect(reg, ep, args.out, seed=args.seed, grid=args.grid)
    except (loading.RegistryError, ValueError) as e:  # ValueError: a memory that is no 2-D map
        print(f"jobs.inspect: {redact_text(str(e))}", file=sys.stderr)
        return 2
    figures.report("inspect", args, reg, ep, paths)
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
