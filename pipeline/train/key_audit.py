"""The record of which images each rank trained on: the evidence for exactly-once delivery across restarts.

With `data.audit_dir` set, every rank writes one JSON line per optimiser step, {"step", "epoch", "keys"}, to a file
of its own per worker group (rank<r>-<unix ns>-<pid>.jsonl), flushed line by line so that a process killed with its
node leaves every step it finished. A restarted group replays the steps after its checkpoint: what the model kept
of an epoch is, per (rank, step), the line of the newest file holding that step (`trained_keys`).

Off by default (a write per step); for auditing a cluster's recovery, not for speed.
"""
from __future__ import annotations

import json
import os
import pathlib
import time

import numpy as np


class KeyAudit:
    """Appends the keys of each step of one rank to its file in `folder` (a local or shared file system)."""

    def __init__(self, folder: str, rank: int):
        path = pathlib.Path(folder.removeprefix("file://"))
        path.mkdir(parents=True, exist_ok=True)
        self.path = path / f"rank{rank}-{time.time_ns()}-{os.getpid()}.jsonl"
        self._file = open(self.path, "a", buffering=1)  # line-buffered: a killed process loses no finished step

    def record(self, step: int, epoch: int, keys: np.ndarray) -> None:
        real = np.asarray(keys).reshape(-1)
        self._file.write(json.dumps({"step": step, "epoch": epoch, "keys": real[real >= 0].tolist()}) + "\n")

    def close(self) -> None:
        self._file.close()


def read(folder: str | pathlib.Path) -> dict[tuple[int, str], list[dict]]:
    """{(rank, file name): its lines}, files in the order they were started."""
    out = {}
    for f in sorted(pathlib.Path(folder).glob("rank*.jsonl"), key=lambda p: int(p.name.split("-")[1])):
        rank = int(f.name.split("-")[0][len("rank"):])
        out[(rank, f.name)] = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return out


def trained_keys(folder: str | pathlib.Path, epoch: int) -> dict[tuple[int, int], list[int]]:
    """{(rank, step): keys} of one epoch as the final model saw them: a replayed step's newest record wins."""
    kept: dict[tuple[int, int], list[int]] = {}
    for (rank, _), lines in read(folder).items():  # oldest file first, so newer records overwrite
        for line in lines:
            if line["epoch"] == epoch:
                kept[(rank, line["step"])] = line["keys"]
    return kept
