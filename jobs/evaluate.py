"""Evaluate a registered model on a prepared dataset's fixed test episodes.

    python -m jobs.evaluate --model models:/kpp-digits@champion --data outputs/shards/digits [--iwae-samples S]

Loads the version's weights and config through the tracking server (MLFLOW_TRACKING_URI; no storage credentials,
nothing unpickled but tensors), checks the data against the version's tags (dataset, image shape, bit depth,
episode length), and evaluates on the test episodes the training job measured its final bound on: the chain bound
(each image from a memory of the images before it: a proper bound on -ln p(X)/T), the leave-one-out bound (from
the other images), the memory-conditional bound (the image in its own memory: the paper's quantity), each as an
-ELBO and an IWAE bound with S samples, and the memory-swap gap, each with a 95% interval over episodes, in
nats/image (binarized data) or bits/dim (8-bit). Prints a table beside the
version's recorded numbers, writes the JSON record and logs an evaluation run linked to the version.
--workers N spreads the episodes over N Ray tasks (RAY_ADDRESS, or a local cluster); the numbers do not change.
Exit status: 0 done, 2 bad input (unknown model, alias not set, data that does not match the model, tracking
server down), 1 evaluation failed.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="models:/NAME@ALIAS or models:/NAME/VERSION")
    ap.add_argument("--data", required=True, help="URL of the prepared dataset (the --out of jobs.prepare)")
    ap.add_argument("--iwae-samples", type=positive, default=0,
                    help="importance samples S of the IWAE bounds (default: the training's eval.iwae_samples)")
    ap.add_argument("--episodes", type=positive, default=0,
                    help="test episodes (default: the training's data.test_episodes, the recorded bound's)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the draws (default: the training's eval.seed)")
    ap.add_argument("--no-leave-one-out", action="store_true", help="skip the leave-one-out bounds (T x cheaper)")
    ap.add_argument("--workers", type=positive, default=1, help="Ray tasks to spread the episodes over")
    ap.add_argument("--batch-size", type=positive, default=16,
                    help="episodes per batch of draws (default 16, as the training's final evaluation)")
    ap.add_argument("--json", default="", help="where to write the JSON record (default "
                                               "outputs/evaluations/<name>-v<version>.json)")
    ap.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else jobs.train's store")
    ap.add_argument("--experiment", default="", help="experiment of the evaluation run (default: the training "
                                                     "run's)")
    ap.add_argument("--no-log", action="store_true", help="do not log an evaluation run")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.registry import evaluation, loading
    from pipeline.urls import redact_text
    try:
        reg = loading.load(args.model, args.tracking_uri)
        tests = evaluation.test_set(reg, args.data, args.episodes)
    except loading.RegistryError as e:
        print(f"jobs.evaluate: {redact_text(str(e))}", file=sys.stderr)
        return 2
    uri = loading.tracking_uri(args.tracking_uri)
    result = evaluation.evaluate(reg, tests, iwae_samples=args.iwae_samples, seed=args.seed,
                                 leave_one_out=not args.no_leave_one_out, batch_size=args.batch_size,
                                 workers=args.workers)
    if not args.no_log:
        result["evaluation_run_id"] = evaluation.log_run(uri, reg, result, args.experiment)
    path = pathlib.Path(args.json or f"outputs/evaluations/{reg.name}-v{reg.version}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(evaluation.table(result))
    print(f"JSON: {path}" + (f"; evaluation run {result['evaluation_run_id']}" if not args.no_log else ""))
    return 0


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
