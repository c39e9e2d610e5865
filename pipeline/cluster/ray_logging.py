"""Set up logging in the job's Ray processes (runtime_env `worker_process_setup_hook`).

Kept free of heavy imports: Ray runs it in every worker process it starts, the small system actors included.

Train V2's placement-group cleaner asks the State API every second whether the Train controller is alive. The
State API is served by the dashboard, which a local cluster of `ray[train]` does not run, so every ask fails and
the cleaner logs "Failed to query Ray Train Controller actor state ..." at WARNING: several lines a second in
the user's terminal for the whole job, about a check that cannot work here and needs no action. Only that logger
is raised to ERROR; every other warning still reaches the driver.
"""
from __future__ import annotations

import logging

# where Train V2 (2.60) logs the cleaner's complaints; a rename in Ray makes this a no-op, not an error
QUIET = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet_state_api_warnings() -> None:
    for name in QUIET:
        logging.getLogger(name).setLevel(logging.ERROR)


def setup_worker() -> None:
    """The setup hook of the job's Ray processes: quiet the cleaner, and redact what the process writes (its lines
    are forwarded to the driver and kept in the cluster's log files)."""
    from pipeline.redaction import install
    quiet_state_api_warnings()
    install()
