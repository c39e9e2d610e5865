"""Submit a job of this project to a Ray cluster through the Jobs API, follow its log, return its exit status.

    python -m jobs.submit [--address http://<head>:8265] -- python -m jobs.train --config jobs/configs/mnist_gpu.yaml

The address defaults to RAY_API_SERVER_ADDRESS, then RAY_ADDRESS (as `ray job submit`). The working dir (default:
the repository root) is uploaded with the runtime env of infra/runtime_env.yaml. Before anything is uploaded, the
entrypoint's config is validated, its storage must be durable (s3:// or an absolute shared path: a relative path
lands in the job's temporary copy and is deleted with it) and a cluster without an autoscaler must have the GPUs.
Exit status: the job's own (0 done, 2 bad config), 2 when the submission was refused here, 1 failed.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shlex
import sys
import time

from pipeline.urls import redact_text

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m jobs.submit", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS"),
                    help="the Jobs API, http://<head>:8265 (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS)")
    ap.add_argument("--working-dir", default=str(ROOT), help="uploaded as the job's working dir (default: the repo)")
    ap.add_argument("--runtime-env", default=None, help="runtime env YAML (default: infra/runtime_env.yaml)")
    ap.add_argument("--submission-id", default=None, help="job id to use (default: Ray picks one)")
    ap.add_argument("--no-wait", action="store_true", help="print the job id and return once it is submitted")
    ap.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- python -m jobs.<name> ...")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from pipeline.cluster import submission as sub
    cmd = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    try:
        if not args.address:
            raise sub.SubmitError("--address: not given and neither RAY_API_SERVER_ADDRESS nor RAY_ADDRESS is set")
        if not args.address.startswith(("http://", "https://")):
            raise sub.SubmitError(f"--address: {args.address!r} is not the Jobs API; it is the dashboard's "
                                  f"http://<head>:8265")
        if not cmd:
            raise sub.SubmitError("no entrypoint: append -- python -m jobs.<name> ...")
        working_dir = pathlib.Path(args.working_dir).resolve()
        cfg = sub.check_entrypoint(cmd, working_dir)
        state = sub.cluster_state(args.address.rstrip("/"))
        if cfg is not None:
            sub.check_resources(cfg, state)
        renv = sub.runtime_env(working_dir, pathlib.Path(args.runtime_env) if args.runtime_env else sub.RUNTIME_ENV)
    except sub.SubmitError as e:
        print(f"jobs.submit: {redact_text(str(e))}", file=sys.stderr)
        return 2
    from ray.job_submission import JobSubmissionClient

    from pipeline.job_env import SUBMITTED_AT_KEY
    client = JobSubmissionClient(args.address)
    # the submit time travels with the job: the driver reports submit -> first step (pipeline.job_env.job_start)
    job_id = client.submit_job(entrypoint=shlex.join(cmd), runtime_env=renv, submission_id=args.submission_id,
                               metadata={SUBMITTED_AT_KEY: repr(time.time())})
    print(f"jobs.submit: submitted {job_id} to {args.address}: {shlex.join(cmd)}", flush=True)
    if args.no_wait:
        return 0
    try:
        info = sub.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\njobs.submit: stopped following; the job goes on. Follow: ray job logs -f {job_id}; "
              f"stop: ray job stop {job_id}", file=sys.stderr)
        return 130
    code = sub.exit_status(info)
    print(f"jobs.submit: job {job_id} {getattr(info.status, 'value', info.status)} (exit {code})"
          + (f": {info.message}" if code and info.message else ""), flush=True)
    return code


if __name__ == "__main__":
    from pipeline.redaction import install
    install()  # no credential in what this process writes (pipeline.redaction)
    sys.exit(main())
