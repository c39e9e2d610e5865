"""Sweep training hyperparameters with Ray Tune: each trial a Ray Train run, tracked in MLflow under one parent run.

    python -m jobs.tune --config jobs/configs/tune_cpu.yaml [field=value ...]

The same command runs locally (a local Ray cluster) and under `ray job submit` / jobs.submit. The sweep YAML
holds the training config (a file plus overrides), a `search:` section over its fields (choice, grid, uniform,
loguniform, randint), the metric and mode (default valid_chain_neg_elbo, the validation chain bound), the number
of trials and ASHA's settings (pipeline/tune/space.py).
Re-running the same command after the driver died resumes the sweep without rerunning finished trials.
The best finished trial is registered as a new version of `<tracking.registered_model>-<dataset>` (alias
tracking.alias, candidate by default) and becomes `champion` only if its test bound (tracking.champion_metric,
the chain bound by default) beats the champion's on the same test episodes.
Exit status: 0 done, 2 invalid sweep or unusable storage/data/tracking/cluster (no trial started), 1 failed.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

from pipeline import cli
from pipeline.train.config import ConfigError
from pipeline.urls import redact_text


def parse(argv: list[str] | None) -> argparse.Namespace:
    return cli.tune_args(argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.tune import space
    try:
        sweep = space.load(args.config, args.overrides)
    except ConfigError as e:
        print(f"jobs.tune: invalid sweep: {redact_text(str(e))}", file=sys.stderr)
        return 2
    from pipeline.registry.tracking import TrackingError
    from pipeline.tune import sweep as sweeping
    text = pathlib.Path(args.config).read_text() if args.config else ""
    try:
        out = sweeping.run(sweep, text)
    except (ConfigError, TrackingError) as e:
        print(f"jobs.tune: {redact_text(str(e))}", file=sys.stderr)
        return 2
    print(out.table)
    if out.model_version:
        d = out.decision
        print(f"registered {out.model_name} version {out.model_version} (trial {out.best_trial}, alias candidate); "
              f"champion: {'moved' if d.promoted else 'not moved'}: {d.reason}")
    elif out.best_trial:
        print(f"best trial {out.best_trial}; nothing registered")
    else:
        print("jobs.tune: no trial finished: nothing registered (the table above names each trial's outcome)",
              file=sys.stderr)
        return 1
    print(json.dumps({"parent_run_id": out.parent_run_id, "best_trial": out.best_trial, "resumed": out.resumed,
                      "model": out.model_name, "version": out.model_version,
                      "champion_moved": bool(out.decision and out.decision.promoted)}))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
