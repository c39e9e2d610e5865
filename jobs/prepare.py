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

from pipeline import cli
from pipeline.data.shards.prepare import PrepareConfig, prepare
from pipeline.urls import redact, redact_text
from pipeline.data.sources import DataSourceError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.prepare_args(argv, __doc__.split("\n\n")[0])


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
