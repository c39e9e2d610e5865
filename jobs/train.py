"""Train Kanerva++ with Ray Train (DDP), checkpoints on local or S3 storage, MLflow tracking and registry.

    python -m jobs.train --config jobs/configs/local.yaml [section.field=value ...]

The same command runs on a laptop (starts a local Ray cluster) and on a cluster (RAY_ADDRESS, or
`ray job submit --working-dir . --runtime-env infra/runtime_env.yaml -- python -m jobs.train ...`).
Re-running a job with the same `name` resumes it from its latest complete checkpoint.
Exit status: 0 done (or halted at train.halt_at_step), 2 invalid config or unusable storage/data/tracking
(nothing was started), 1 training failed.
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline import cli
from pipeline.train import config
from pipeline.urls import redact_text, redact_tree


def parse(argv: list[str] | None) -> argparse.Namespace:
    return cli.train_args(argv, __doc__)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    try:
        cfg = config.load(args.config, args.overrides)
    except config.ConfigError as e:
        print(f"jobs.train: invalid config: {redact_text(str(e))}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(redact_tree(cfg.to_dict()), indent=1))
        return 0
    from pipeline.cluster import driver  # after validation: importing Ray is slow and a bad config should not wait for it
    from pipeline.cluster.failures import JobFailure
    from pipeline.job_env import job_start
    from pipeline.registry.tracking import TrackingError
    try:
        cfg = driver.resolved(cfg)  # as the job runs it: the model's image fields follow the data's card
        # the clock of the submit-to-first-step figure: jobs.submit's stamp, else this process's start
        out = driver.run(cfg, driver.RunOptions(started=job_start()))
    except (config.ConfigError, TrackingError) as e:
        print(f"jobs.train: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except JobFailure as e:  # training started and ended as a retry could not mend: no traceback of Ray's
        print(f"jobs.train: training failed: {redact_text(str(e))}", file=sys.stderr)
        return 1
    m = out.metrics
    print(f"run {out.run_id or '-'}: {'finished' if out.finished else 'halted'} at step {out.step}"
          f"{' (resumed)' if out.resumed else ''}; checkpoint {redact_text(out.checkpoint)}")
    if out.finished:
        nan, s = float("nan"), int(m["test/iwae_samples"])
        print(f"test bounds ({cfg.model.unit}; -ELBO, IWAE with S={s}), by what the memory scoring each image holds:")
        for label, key in (("chain (the images before it; bounds -ln p(X)/T)", "chain"),
                           ("leave-one-out (the other images)", "loo"),
                           ("memory-conditional (the image itself too; the paper's)", "")):
            elbo, iwae = (f"test/{key}_neg_elbo", f"test/{key}_iwae") if key else ("test/neg_elbo", "test/iwae")
            print(f"  {label:<56} {m.get(elbo, nan):10.3f}  IWAE {m.get(iwae, nan):10.3f}")
        print(f"  memory swap gap (another episode's memory - own) {m['test/swap_gap']:+.3f}")
        idle = m.get("keys_at_floor") or []
        if idle and cfg.model.memory.writer != "none":  # without a memory no key has an address
            print(f"key reads {', '.join(map(str, idle))} of {cfg.model.key_terms} stayed at the "
                  f"free-bits floor for the whole run (KL_y per key: train/kl_y_key<k>): they carried no address")
        if out.model_version:
            print(f"registered model {out.model_name} version {out.model_version} "
                  f"(alias {cfg.tracking.alias}, models:/{out.model_name}@{cfg.tracking.alias}); sample grid {out.grid}")
            if out.champion is not None:
                print(f"champion: {'moved' if out.champion.promoted else 'not moved'}: {out.champion.reason}")
    print(json.dumps({"run_id": out.run_id, "step": out.step, "finished": out.finished,
                      "model": out.model_name, "model_version": out.model_version,
                      "champion_moved": bool(out.champion and out.champion.promoted),
                      "grid": out.grid, "checkpoint": out.checkpoint,
                      **{k: v for k, v in m.items() if k.startswith("test/")}}))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
