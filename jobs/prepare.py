"""Prepare a dataset as WebDataset episode shards with a Parquet manifest and a JSON dataset card.

    python -m jobs.prepare --dataset binarized_mnist --source ../shared/data/binarized_mnist --out s3://bucket/bmnist

S3 endpoint and credentials come from the standard AWS environment variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) or --endpoint-url; they are never printed or
written. Re-running after an interruption rewrites only missing or damaged shards. Prints a JSON summary.
"""
from __future__ import annotations

import argparse
import json
import re
import sys

from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.urls import redact, redact_text
from pipeline.data.sources import DATASETS, DataSourceError


def positive(text: str) -> int:
    """argparse type: an integer >= 1 (argparse names the flag and exits 2 otherwise)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.prepare", description=__doc__.split("\n\n")[0])
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.job_env import check_durable_output
    from pipeline.train.config import ConfigError
    try:
        check_durable_output({"--out": args.out})  # under `ray job submit` a relative --out is deleted with the job
    except ConfigError as err:
        print(f"prepare: {redact_text(str(err))}", file=sys.stderr)
        return 2
    try:
        config = PrepareConfig(
            dataset=args.dataset,
            source=args.source,
            out=args.out,
            shard_size=args.shard_size,
            block_size=args.block_size,
            episode_length=args.episode_length,
            seed=args.seed,
            workers=args.workers,
            compress=args.compress,
            splits=tuple(s.strip() for s in args.splits.split(",") if s.strip()),
            source_options={"resize": args.resize} if args.resize else {},
            storage_options={"endpoint_url": args.endpoint_url} if args.endpoint_url else {},
            progress=not args.no_progress,
        )
    except ValueError as err:  # "PrepareConfig.<field> must be ...": named as the flag the user typed
        message = re.sub(r"PrepareConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), str(err))
        print(f"prepare: {redact_text(message)}", file=sys.stderr)
        return 2
    try:
        report = prepare(config)
    except (DataSourceError, ValueError) as err:
        print(f"prepare: {redact_text(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # the store of --out (or --source) unreachable or refusing, after the retries
        print(f"prepare: --out {redact(args.out)} / --source: storage error: {redact_text(str(err))}", file=sys.stderr)
        return 2
    print(json.dumps({"out": redact(args.out), "shards": len(report.records), "written": report.written,
                      "skipped": report.skipped, "images": sum(r.num_samples for r in report.records)}))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
