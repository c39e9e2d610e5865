"""Training checkpoints that count only once complete.

A checkpoint is a folder holding `state.pt` (model, optimiser, scheduler, RNG, step, data cursor, counters) and,
written last, `COMPLETE.json` with the state file's size and sha256. A folder without that marker, or whose state
file does not match it (a worker killed mid-save, a truncated upload: Ray #41700), is not a checkpoint: `load`
raises `IncompleteCheckpoint` naming it and `latest_complete` skips it.

Ray Train uploads the folder and decides which to keep (pipeline/cluster/driver.py sets CheckpointConfig); this module
only writes and reads one folder, so the same files serve the Ray loop, the torchrun benchmark and tests.
Loading uses `torch.load(weights_only=True)`: tensors and plain containers only, never pickled code.

Remote stores (S3 through a pyarrow filesystem) are called through pipeline.retry: an outage shorter than the
retry policy is waited out, a longer one raises `CheckpointStoreError`. Restore never mistakes an unreachable
store for "no checkpoint": resuming an older checkpoint or step 0 inside a resumed run would silently redo work
and drop metrics. Uploads write the state file first and the marker last, so a kill mid-upload leaves a folder
that `verify` refuses.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib
import random
from typing import Any

import torch

from pipeline.retry import RetryPolicy, with_retries

STATE = "state.pt"
MARKER = "COMPLETE.json"
PREFIX = "checkpoint_"
FORMAT = "kpp-train/1"


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint folder that was never finished or does not match its completion marker."""


class CheckpointStoreError(OSError):
    """The checkpoint store could not be read or written, even after retrying: fail loudly, never guess."""


# Long enough to ride out a restart of the store (0.5+1+2+4+8+8+8 = 31.5 s of backoff), short enough that a
# store that is really gone fails the job within a minute instead of hanging it.
STORE_RETRY = RetryPolicy(max_attempts=8, backoff_s=0.5, backoff_max_s=8.0)


class NonFiniteState(RuntimeError):
    """Refused to checkpoint parameters holding NaN/inf: a bad step must never overwrite a good checkpoint."""


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def snapshot(*, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, step: int,
             cursor: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The payload of a checkpoint, every tensor copied to host memory: what the training thread must do before
    the next step changes the state. Writing it (`write`) can then run beside training."""
    def host(value: Any) -> Any:
        if torch.is_tensor(value):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: host(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(host(v) for v in value)
        return value
    return {"format": FORMAT, "step": int(step), "cursor": dict(cursor),
            "model": host(model.state_dict()), "optimizer": host(optimizer.state_dict()),
            "scheduler": scheduler.state_dict() if scheduler is not None else {},
            "rng": rng_state(), "extra": copy.deepcopy(extra or {})}


def write(folder: str | os.PathLike, payload: dict[str, Any]) -> pathlib.Path:
    """Write a snapshot as one complete checkpoint into `folder` (created); the marker goes last."""
    folder = pathlib.Path(folder)
    step = payload["step"]
    bad = [k for k, v in payload["model"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise NonFiniteState(f"step {step}: non-finite values in {bad[:5]}; checkpoint not written")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (STATE + ".partial")
    torch.save(payload, tmp)
    os.replace(tmp, folder / STATE)
    marker = {"format": FORMAT, "step": int(step), "bytes": (folder / STATE).stat().st_size,
              "sha256": _sha256(folder / STATE)}
    (folder / MARKER).write_text(json.dumps(marker))
    return folder


def save(folder: str | os.PathLike, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         scheduler: Any, step: int, cursor: dict[str, Any], extra: dict[str, Any] | None = None) -> pathlib.Path:
    """Write one complete checkpoint into `folder` (created); the marker goes last."""
    return write(folder, snapshot(model=model, optimizer=optimizer, scheduler=scheduler, step=step, cursor=cursor,
                                  extra=extra))


def step_of(name: str) -> int | None:
    """The step of a `checkpoint_<step>` folder name, None for any other name."""
    digits = name[len(PREFIX):] if name.startswith(PREFIX) else ""
    return int(digits) if digits.isdigit() else None


def load(folder: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The payload of a complete checkpoint; IncompleteCheckpoint otherwise."""
    folder = pathlib.Path(folder)
    marker = verify(folder)
    payload = torch.load(folder / STATE, map_location=map_location, weights_only=True)
    if payload.get("format") != FORMAT or payload.get("step") != marker["step"]:
        raise IncompleteCheckpoint(f"{folder}: state does not match its marker (step {payload.get('step')} "
                                   f"vs {marker['step']})")
    return payload


def verify(folder: pathlib.Path) -> dict[str, Any]:
    """The completion marker of `folder`, after checking the state file against it."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except FileNotFoundError:
        raise IncompleteCheckpoint(f"{folder}: no {MARKER}, the checkpoint was never finished") from None
    except json.JSONDecodeError:
        raise IncompleteCheckpoint(f"{folder}: {MARKER} is corrupt") from None
    state = folder / STATE
    size = state.stat().st_size if state.exists() else -1
    if size != marker["bytes"]:
        raise IncompleteCheckpoint(f"{folder}: {STATE} has {size} bytes, the marker says {marker['bytes']}")
    if _sha256(state) != marker["sha256"]:
        raise IncompleteCheckpoint(f"{folder}: {STATE} does not match the sha256 in {MARKER}")
    return marker


def restore(payload: dict[str, Any], *, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            scheduler: Any) -> None:
    """Load model, optimiser, scheduler and RNG state from a payload (in place)."""
    model.load_state_dict(payload["model"])
    # load_state_dict takes every group setting from the saved state: a checkpoint written by an unfused optimiser
    # would turn off the fused kernels the step's on-device skip needs (pipeline.train.step)
    kernels = [{k: g[k] for k in ("fused", "foreach") if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(payload["optimizer"])
    for group, settings in zip(optimizer.param_groups, kernels):
        group.update(settings)
        for param in group["params"] if group.get("fused") else ():
            state = optimizer.state.get(param, {})
            if torch.is_tensor(state.get("step")):  # fused kernels keep the step count on the parameter's device
                state["step"] = state["step"].to(param.device, torch.float32)
    if scheduler is not None and payload["scheduler"]:
        scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])


def folder_name(step: int) -> str:
    """Zero-padded so that names sort by step."""
    return f"{PREFIX}{step:09d}"


def latest_complete(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete `checkpoint_*` folder under root (incomplete ones skipped), or None."""
    root = pathlib.Path(root)
    for folder in sorted(root.glob("checkpoint_[0-9]*"), reverse=True):
        try:
            verify(folder)
            return folder
        except (IncompleteCheckpoint, OSError, KeyError):
            continue
    return None


def download(fs, root: str, name: str, dst: str | os.PathLike, policy: RetryPolicy = STORE_RETRY) -> pathlib.Path:
    """Copy the checkpoint folder `root/name` on a pyarrow filesystem into `dst/name` (retried); its local path."""
    import pyarrow.fs
    local = pathlib.Path(dst) / name
    local.mkdir(parents=True, exist_ok=True)  # copy_files does not create the destination
    with_retries(f"download {root}/{name}", lambda: pyarrow.fs.copy_files(
        f"{root}/{name}", str(local), source_filesystem=fs, destination_filesystem=pyarrow.fs.LocalFileSystem()),
        policy)
    return local


def fetch_latest_complete(fs, root: str, dst: str | os.PathLike,
                          policy: RetryPolicy = STORE_RETRY) -> pathlib.Path | None:
    """Copy the newest complete `checkpoint_*` folder under `root` on a pyarrow filesystem (local or S3) into `dst`
    and return its local path; folders that fail `verify` (partial uploads) are skipped. None only when the store
    answers and holds no complete checkpoint; CheckpointStoreError when it does not answer (after retries)."""
    import pyarrow.fs
    try:
        infos = with_retries(f"list checkpoints under {root}",
                             lambda: fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True)), policy)
    except OSError as e:
        raise CheckpointStoreError(f"checkpoint store unreachable, not resuming from a guess: {e}") from e
    names = sorted((i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and step_of(i.base_name) is not None), reverse=True)
    for name in names:
        try:
            local = download(fs, root, name, dst, policy)
        except FileNotFoundError:
            continue  # removed since the listing (a keep policy): the next older one
        except OSError as e:
            raise CheckpointStoreError(f"checkpoint store unreachable while reading {root}/{name}: {e}") from e
        try:
            verify(local)
            return local
        except (IncompleteCheckpoint, KeyError, ValueError):
            continue  # a partial upload: the next older one
    return None


def upload(local: str | os.PathLike, fs, root: str, name: str, policy: RetryPolicy = STORE_RETRY) -> str:
    """Copy a checkpoint folder to `root/name` on a pyarrow filesystem, every file but the marker first, each
    retried through an outage; returns the remote path. CheckpointStoreError when the store stays down."""
    local = pathlib.Path(local)
    dest = f"{root}/{name}"
    files = sorted((p for p in local.rglob("*") if p.is_file()), key=lambda p: p.name == MARKER)  # marker last
    try:
        with_retries(f"create {dest}", lambda: fs.create_dir(dest, recursive=True), policy)
        for path in files:
            target = f"{dest}/{path.relative_to(local).as_posix()}"

            def put(path=path, target=target) -> None:
                with fs.open_output_stream(target) as out, open(path, "rb") as src:
                    while block := src.read(8 << 20):
                        out.write(block)
            with_retries(f"upload {target}", put, policy)
    except OSError as e:
        raise CheckpointStoreError(f"could not write checkpoint {dest}: {e}") from e
    return dest


def prune(fs, root: str, keep: set[str]) -> list[str]:
    """Delete the `checkpoint_<step>` folders under `root` (a pyarrow filesystem, local or S3) whose names are not
    in `keep`; return the deleted names. Ray's keep policy only removes checkpoints its controller registered; one
    complete on storage but never registered (a crash right after its upload, then resumed through
    `fetch_latest_complete`) would otherwise stay forever. Call it only when no job is running in `root`."""
    import pyarrow.fs
    infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
    doomed = sorted(i.base_name for i in infos if i.type == pyarrow.fs.FileType.Directory
                    and step_of(i.base_name) is not None and i.base_name not in keep)
    for name in doomed:
        fs.delete_dir(f"{root}/{name}")
    return doomed


def _sha256(path: pathlib.Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
