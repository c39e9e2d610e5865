"""The command lines of the jobs users submit: one place for what each accepts, read by the jobs themselves
(jobs/train.py, jobs/tune.py, jobs/prepare.py) and by jobs.submit's check of an entrypoint before upload
(pipeline.cluster.submission), so the library never imports its entry points."""
from __future__ import annotations

import argparse


def train_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    from pipeline.train import config
    ap = argparse.ArgumentParser(prog="python -m jobs.train", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="fields (set any with section.field=value):\n" + config.describe())
    ap.add_argument("--config", help="YAML run config (jobs/configs/*.yaml); defaults for every field if omitted")
    ap.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    ap.add_argument("overrides", nargs="*", metavar="section.field=value", help="override one field")
    return ap.parse_args(argv)


def tune_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.tune", description=description,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="sweep YAML (jobs/configs/tune_*.yaml)")
    ap.add_argument("overrides", nargs="*", metavar="field=value", help="override a field of the sweep YAML")
    return ap.parse_args(argv)


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag and exits 2 otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def prepare_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    from pipeline.data.sources import DATASETS
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=description)
    parser.add_argument("--dataset", required=True, choices=DATASETS, help="which dataset the source holds")
    parser.add_argument("--source", default=None, help="directory/file URL of the source files (none for digits)")
    parser.add_argument("--out", required=True, help="URL to write the prepared dataset to (path, file://, s3://)")
    parser.add_argument("--shard-size", type=positive, default=10_000, help="images per shard (default 10000)")
    parser.add_argument("--block-size", type=positive, default=500, help="images per packed block in a shard (default 500)")
    parser.add_argument("--episode-length", type=positive, default=32,
                        help="T of the fixed valid/test episodes stored in episode order (default 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the storage order and fixed episodes (default 0)")
    parser.add_argument("--workers", type=positive, default=1, help="processes writing shards in parallel (default 1)")
    parser.add_argument("--compress", action="store_true",
                        help="gzip the image blocks: ~4x smaller 8-bit shards, slower to decode (for slow stores)")
    parser.add_argument("--splits", default="train,valid,test", help="comma-separated splits (default all three)")
    parser.add_argument("--resize", type=int, default=None, help="resize images to this size (omniglot, folder)")
    parser.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL or AWS)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    return parser.parse_args(argv)
