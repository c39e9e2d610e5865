"""Rank 0's MLflow logger for one run, importing MLflow only where it logs: the training loop runs without MLflow
installed (jobs.torchrun_train on a bare GPU box) when tracking is off."""
from __future__ import annotations

import logging
import os
import pathlib
import queue
import tempfile
import threading
import time
from typing import Any

from pipeline.retry import RetryPolicy, with_retries
from pipeline.urls import redact, redact_text

log = logging.getLogger(__name__)
CLIENT_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# The job's last writes (pending metrics, test bounds' tags, final figures, curves) wait this long for a tracking
# server that is down: 0.5 s doubling to 30 s, 20 attempts, ~7 minutes. Training is done by then and its
# checkpoint stored; failing the job at its end for an outage it could outlast (a restart, a short partition)
# would throw the run's result away. The ranks wait in Ray's report barrier meanwhile, not a collective.
END_POLICY = RetryPolicy(max_attempts=20, backoff_max_s=30.0)


def _set_all(marks: list[threading.Event]) -> list[threading.Event]:
    for mark in marks:
        mark.set()
    return []


class TrackingError(RuntimeError):
    """The tracking store cannot be used; raised before training starts."""


class RankZeroLogger:
    """Metrics and artifacts of one run, written only where `active` (world rank 0); a no-op elsewhere.

    Metrics are sent by a background thread: a request to the server (10-30 ms here, minutes while MLflow's client
    retries through an outage) never holds up the step loop. An outage of the tracking server must not kill
    training nor lose metrics: what the server refuses is kept in order and sent again (`pending`: on the next
    metrics, or after `retry_s`), and `flush` at the end of the job waits for the server (pipeline.retry) before
    giving up loudly."""

    def __init__(self, uri: str, run_id: str, active: bool, retry_s: float = 5.0, send_interval_s: float = 1.0):
        self.active = active and bool(run_id)
        self.run_id = run_id
        if self.active:
            # MLflow's client retries a request for minutes by default (7 retries, backoff factor 2, 120 s
            # timeout); in the training process a request gives up within seconds instead, and this logger's
            # own schedule (pending, retry_s, flush) carries the metrics through an outage of any length
            for k, v in CLIENT_LIMITS.items():
                os.environ.setdefault(k, v)
            from mlflow.tracking import MlflowClient
            self.client = MlflowClient(uri)
        else:
            self.client = None
        self._floor: dict[str, int] = {}  # per metric: the highest step already in the store
        self.pending: list = []  # mlflow Metric  # metrics not yet accepted by the server, oldest first
        self._lock = threading.Lock()  # pending and _floor: the sender thread and flush
        self._queue: queue.Queue = queue.Queue()  # (metrics, step, unix ms) from the training thread
        self._sender: threading.Thread | None = None
        self._retry_s = retry_s
        self.send_interval_s = send_interval_s
        self.server_down = False  # the last send failed: delivered() does not wait for a server that is down

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Queue one step's metrics (floats) for the sender thread; returns at once."""
        if not self.active:
            return
        self._queue.put(({k: float(v) for k, v in metrics.items()}, int(step), int(time.time() * 1000)))
        if self._sender is None:
            self._sender = threading.Thread(target=self._send_forever, name="mlflow-metrics", daemon=True)
            self._sender.start()

    def delivered(self, timeout_s: float = 60.0) -> bool:
        """Wait until every metric logged before this call is in the store (True), or timeout_s passed (False: the
        server is down; they stay pending). The Checkpointer calls it before a checkpoint is reported: a worker
        killed after that checkpoint resumes from it, and the steps before it must not be lost with the queue."""
        if not self.active or self._sender is None:
            return True
        if self.server_down:
            return False
        mark = threading.Event()
        self._queue.put(mark)
        return mark.wait(timeout_s)

    def _send_forever(self) -> None:
        """Take what is queued and send it in one request, at most one request per `send_interval_s`: the
        request's Python work (entities, JSON, HTTP) holds the GIL, and at a log step every few milliseconds it
        would take a share of the training thread's. Marks (`delivered`) are set once what came before them is
        in the store."""
        last = 0.0
        marks: list[threading.Event] = []
        while True:
            try:
                items = [self._queue.get(timeout=self._retry_s if self.pending else None)]
            except queue.Empty:  # nothing new, something pending: try the server again
                with self._lock:
                    if self._send():
                        marks = _set_all(marks)
                continue
            if not isinstance(items[0], threading.Event):  # someone waits for a mark: send now
                time.sleep(max(0.0, last + self.send_interval_s - time.monotonic()))
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                with self._lock:
                    for item in items:
                        if isinstance(item, threading.Event):
                            marks.append(item)
                        else:
                            self._take(*item)
                    if self._send():
                        marks = _set_all(marks)
            except Exception:  # noqa: BLE001 - the thread must outlive any one failure; flush reports what is left
                log.exception("MLflow metrics sender: unexpected error")
            finally:
                last = time.monotonic()
                for _ in items:
                    self._queue.task_done()

    def _take(self, metrics: dict[str, float], step: int, now: int) -> None:
        from mlflow.entities import Metric
        try:
            fresh = [Metric(k, v, now, step) for k, v in metrics.items() if step > self._floor_of(k)]
        except Exception as e:  # noqa: BLE001 - the server is down: keep everything, sort it out on the next call
            log.warning("MLflow unreachable (%s): %d metrics of step %d kept for later", redact_text(str(e)), len(metrics),
                        step)
            fresh = [Metric(k, v, now, step) for k, v in metrics.items()]
        self.pending += fresh

    def _send(self) -> bool:
        """Send what is pending (at most 1000 metrics per request, MLflow's limit); False if the server failed."""
        while self.pending:
            batch = self.pending[:1000]
            try:
                self.client.log_batch(self.run_id, metrics=batch)
            except Exception as e:  # noqa: BLE001 - connection errors come as MlflowException, OSError, requests errors
                log.warning("MLflow log_batch failed (%s); %d metrics pending", redact_text(str(e)), len(self.pending))
                self.server_down = True
                return False
            del self.pending[:len(batch)]
            for m in batch:
                self._floor[m.key] = max(self._floor.get(m.key, -1), m.step)
        self.server_down = False
        return True

    def flush(self, policy=None) -> None:
        """Wait (retrying) until every pending metric is in the store; raise TrackingError if it never comes back."""
        if not self.active:
            return
        self._queue.join()  # the sender thread has taken (and tried to send) everything queued so far
        if not self.pending:
            return

        def attempt() -> None:
            with self._lock:
                if not self._send():
                    raise ConnectionError(f"{len(self.pending)} metrics still pending")
        try:
            with_retries("send pending MLflow metrics", attempt, policy or END_POLICY)
        except OSError as e:
            raise TrackingError(f"tracking.uri: {len(self.pending)} metrics could not be written: {e}") from e

    def _floor_of(self, key: str) -> int:
        if key not in self._floor:  # first use after a (re)start: ask the store what this run already holds
            history = self.client.get_metric_history(self.run_id, key)
            self._floor[key] = max((m.step for m in history), default=-1)
        return self._floor[key]

    def log_curves(self, keys: list[str], artifact_file: str = "curves/loss.png") -> None:
        """Plot these metrics' full history in this run (all restarts included) and log the PNG."""
        if not self.active:
            return
        from pipeline.registry.curves import plot_curves
        self.flush()  # the curves show every step, including any kept through an outage
        histories = {k: [(m.step, m.value) for m in self._retried(
            f"read {k}", lambda k=k: self.client.get_metric_history(self.run_id, k))] for k in keys}
        with tempfile.TemporaryDirectory() as d:
            path = plot_curves(histories, pathlib.Path(d) / pathlib.Path(artifact_file).name)
            self.log_artifact(path, str(pathlib.Path(artifact_file).parent))

    def log_artifact(self, local_path: str | pathlib.Path, artifact_path: str | None = None,
                     attempts: int | None = None) -> None:
        if self.active:
            self._retried(f"log artifact {local_path}",
                          lambda: self.client.log_artifact(self.run_id, str(local_path), artifact_path), attempts)

    def log_image(self, image, key: str, step: int, attempts: int | None = None) -> None:
        """An image (uint8 [H, W, 3]) as one step of the image series `key` (MlflowClient.log_image): the MLflow UI
        shows the series with a step slider."""
        if self.active:
            self._retried(f"log image {key} at step {step}",
                          lambda: self.client.log_image(self.run_id, image, key=key, step=step, synchronous=True),
                          attempts)

    def log_table(self, columns: dict[str, list], artifact_file: str, key: str, attempts: int | None = None) -> None:
        """Rows (column -> values) as an MLflow table (MlflowClient.log_table, .json: the run's Tables view shows
        it). MLflow appends to a table the run holds already; rows whose `key` value is in it already are left out,
        so a retry after a failure part-way through, or the same step evaluated again after a resume, adds nothing
        twice."""
        if not self.active:
            return
        import pandas as pd
        rows = pd.DataFrame(columns)

        def append() -> None:
            held = self._table(artifact_file)
            fresh = rows if held is None or key not in held else rows[~rows[key].isin(set(held[key]))]
            if len(fresh):
                self.client.log_table(self.run_id, fresh, artifact_file)
        self._retried(f"log table {artifact_file}", append, attempts)

    def _table(self, artifact_file: str):
        """The run's table `artifact_file` (a DataFrame), None when it has none."""
        import pandas as pd
        folder = str(pathlib.PurePosixPath(artifact_file).parent)
        held = {f.path for f in self.client.list_artifacts(self.run_id, None if folder == "." else folder)}
        if artifact_file not in held:
            return None
        with tempfile.TemporaryDirectory() as d:
            return pd.read_json(self.client.download_artifacts(self.run_id, artifact_file, d), orient="split")

    def log_dict(self, d: dict[str, Any], artifact_file: str) -> None:
        if self.active:
            self._retried(f"log {artifact_file}", lambda: self.client.log_dict(self.run_id, d, artifact_file))

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.active:
            from mlflow.entities import RunTag
            self._retried("set tags", lambda: self.client.log_batch(
                self.run_id, tags=[RunTag(k, redact(str(v))) for k, v in tags.items()]))

    @staticmethod
    def _retried(what: str, action, attempts: int | None = None):
        """`attempts` tries 8 s apart at most; None: the end-of-job budget (END_POLICY)."""
        policy = END_POLICY if attempts is None else RetryPolicy(max_attempts=attempts, backoff_max_s=8.0)
        try:
            return with_retries(what, action, policy)
        except OSError as e:
            raise TrackingError(f"tracking.uri: {what} failed: {e}") from e
