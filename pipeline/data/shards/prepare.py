"""Prepare a dataset as episode shards: load and validate every split, write shards atomically, resume.

    prepare(PrepareConfig(dataset="binarized_mnist", source=".../binarized_mnist", out="s3://bucket/bmnist"))

Order of work, and why:
  1. Every split is loaded and validated BEFORE anything is written, so bad input commits nothing.
  2. Each split is put in its storage order: training images in a seeded random order (so every shard is a
     random sample of the split and the per-epoch shuffle of pipeline.data.shards.plan mixes well); evaluation
     splits in the order of fixed_episodes(n, episode_length, seed), so their T consecutive images are the
     fixed evaluation episodes (the few images left over follow at the end).
  3. Each shard is built in memory (deterministic bytes), written to "<name>.partial-<uuid>" and moved to its
     name only when complete. A shard already at its name with the same size and sha256 (checked against the
     previous manifest, else by reading it back) is skipped: a re-run after a kill redoes only what is missing.
     A name holding other bytes (a re-prepare with another seed or source into a live dataset) is never
     overwritten: the new shard goes beside it as "<name>.<digest>.tar", so jobs reading the old manifest go on.
  4. The dataset card and then the manifest are written last, each atomically. No manifest, no dataset.
Shards are written by a pool of spawned processes when workers > 1 (spawn: s3fs is not fork-safe).
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import platform
import uuid
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import numpy as np

from pipeline.data.episodes import fixed_episodes
from pipeline.data.shards.format import ShardArrays, encode_shard
from pipeline.data.shards.manifest import ManifestError, ShardRecord, read_manifest, write_card, write_labels, write_manifest
from pipeline.data.shards.progress import PrepareProgress
from pipeline.data.shards.source_checksums import source_checksums
from pipeline.storage import filesystem, join, unstrip_protocol
from pipeline.retry import with_retries
from pipeline.data.sources import SPLITS, ImageSet, SourceFormatError, load_split

FORMAT_VERSION = 1
TRAIN_ORDER_STREAM = 2  # keeps the storage shuffle apart from the episode streams of pipeline.data.episodes


@dataclass(frozen=True, kw_only=True)
class PrepareConfig:
    dataset: str
    source: str | None
    out: str
    shard_size: int = 10_000       # images per shard (the unit of reading and of integrity checks)
    block_size: int = 500          # images per packed .npy block inside a shard
    episode_length: int = 32       # T of the fixed evaluation episodes stored in the valid/test order
    seed: int = 0                  # storage order and fixed evaluation episodes
    workers: int = 1               # processes writing shards; 1 writes in this process
    compress: bool = False         # gzip the image members (see pipeline.data.shards.format)
    splits: tuple[str, ...] = SPLITS
    source_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"resize": 28} for omniglot
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("shard_size", "block_size", "episode_length", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"PrepareConfig.{name} must be >= 1, got {getattr(self, name)}")
        unknown = set(self.splits) - set(SPLITS)
        if unknown or not self.splits:
            raise ValueError(f"PrepareConfig.splits must be a non-empty subset of {SPLITS}, got {self.splits}")


@dataclass(frozen=True)
class PrepareReport:
    records: list[ShardRecord]
    written: int
    skipped: int


@dataclass(frozen=True)
class ShardTask:
    out: str
    split: str
    shard_index: int
    arrays: ShardArrays
    block_size: int
    bit_depth: int
    compress: bool
    known: ShardRecord | None  # this shard's row in a previous manifest, if any
    storage_options: dict[str, Any]


def storage_order(split: str, num_images: int, episode_length: int, seed: int) -> np.ndarray:
    """The order in which a split's images are stored (see the module docstring)."""
    if split == "train":
        return np.random.default_rng([TRAIN_ORDER_STREAM, seed]).permutation(num_images)
    episodes = fixed_episodes(num_images, episode_length, seed).ravel()
    rest = np.setdiff1d(np.arange(num_images), episodes)  # sorted leftovers, after the last full episode
    return np.concatenate([episodes, rest])


def shard_path(split: str, shard_index: int) -> str:
    return f"{split}/{split}-{shard_index:05d}.tar"


def versioned_shard_path(split: str, shard_index: int, digest: str) -> str:
    """The name of a shard whose plain name holds other committed bytes (an earlier preparation)."""
    return f"{split}/{split}-{shard_index:05d}.{digest[:12]}.tar"


def write_shard(task: ShardTask) -> tuple[ShardRecord, bool]:
    """Writes one shard unless an identical one is already committed; returns its record and whether skipped.

    A re-prepare into a live dataset must not change a file a running job reads through the old manifest: when the
    shard's plain name holds other bytes, the new shard goes beside it under a name with its digest, and the old
    file stays until nothing reads it (the new manifest, committed last, names the new file)."""
    data = encode_shard(task.split, task.shard_index, task.arrays, task.block_size, task.bit_depth, task.compress)
    digest = hashlib.sha256(data).hexdigest()
    fs, root = filesystem(task.out, task.storage_options)

    def holds_it(path: str) -> bool:
        if not (fs.exists(path) and fs.size(path) == len(data)):
            return False
        known = task.known
        if known is not None and join(root, known.path) == path and (known.num_bytes, known.sha256) == (len(data), digest):
            return True
        return hashlib.sha256(fs.cat_file(path)).hexdigest() == digest

    def damaged(relative: str, path: str) -> bool:
        """The committed manifest names this file, and it no longer holds what the manifest says (a killed or
        corrupted write): rewritten in place. Any other file there is some preparation's intact shard."""
        known = task.known
        return (known is not None and known.path == relative
                and (fs.size(path) != known.num_bytes or hashlib.sha256(fs.cat_file(path)).hexdigest() != known.sha256))

    def store() -> tuple[str, bool]:
        """(relative path, skipped): an identical committed shard is kept, else written atomically. Idempotent,
        so retryable."""
        relative = shard_path(task.split, task.shard_index)
        path = join(root, relative)
        if fs.exists(path):
            if holds_it(path):
                return relative, True
            if not damaged(relative, path):  # an intact shard of some preparation: left for its readers
                relative = versioned_shard_path(task.split, task.shard_index, digest)
            path = join(root, relative)
            if holds_it(path):
                return relative, True
        temporary = f"{path}.partial-{uuid.uuid4().hex}"  # unique: two runs must never share a half-written file
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)
        return relative, False

    relative, skipped = with_retries(f"write shard {join(task.out, shard_path(task.split, task.shard_index))}", store)
    record = ShardRecord(task.split, task.shard_index, relative, unstrip_protocol(task.out, join(root, relative)),
                         int(task.arrays.images.shape[0]), len(data), digest)
    return record, skipped


def _remove_partials(out: str, storage_options: dict) -> None:
    """Leftovers of a killed run: never valid (the name says so), removed so they do not accumulate."""
    fs, root = filesystem(out, storage_options)
    for split in SPLITS:
        directory = join(root, split)
        if fs.isdir(directory):
            for path in fs.ls(directory, detail=False):
                if ".partial-" in path.rsplit("/", 1)[-1]:
                    fs.rm(path)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _card(config: PrepareConfig, sets: dict[str, ImageSet], records: list[ShardRecord]) -> dict[str, Any]:
    first = next(iter(sets.values()))
    binarization = {
        "binarized_mnist": "fixed binarization of Salakhutdinov & Murray (2008), Larochelle's files",
        "digits": "fixed seeded Bernoulli sample of the 17-level grey value after bilinear resize to 28x28",
        "omniglot": "binary strokes as released (ink = 1)",
    }.get(config.dataset, "none: 8-bit grey levels" if first.bit_depth == 8 else "as stored in the source (0/1)")
    return {
        "format_version": FORMAT_VERSION,
        "packing": ("bit-packed along W (images.bits.npy)" if first.bit_depth == 1 else "uint8 (images.npy)")
                   + (", gzipped (.gz)" if config.compress else ""),
        "dataset": config.dataset,
        "source": config.source,
        "source_checksums": source_checksums(config.dataset, config.source, config.storage_options),
        "source_options": config.source_options,
        "image_shape": list(first.image_shape),
        "dtype": "uint8",
        "bit_depth": first.bit_depth,
        "has_labels": first.labels is not None,
        "binarization": binarization,
        "splits": {
            split: {"num_images": len(s), "num_shards": sum(r.split == split for r in records)}
            for split, s in sets.items()
        },
        "shard_size": config.shard_size,
        "block_size": config.block_size,
        "episodes": {
            "seed": config.seed,
            "episode_length": config.episode_length,
            "train": "images stored in a seeded random order (numpy default_rng([2, seed])); episodes are re-drawn "
                     "every epoch by the reader from (seed, epoch): shard order and order within each shard",
            "evaluation": "valid/test stored in the order of pipeline.data.episodes.fixed_episodes(n, episode_length, "
                          "seed); each T consecutive images form one fixed episode, leftovers follow at the end",
        },
        "created_with": {"python": platform.python_version(), "numpy": np.__version__,
                         "webdataset": _version("webdataset"), "kanerva-pp": _version("kanerva-pp")},
    }


def prepare(config: PrepareConfig) -> PrepareReport:
    sets = {
        split: load_split(config.dataset, config.source, split, storage_options=config.storage_options,
                          **config.source_options)
        for split in config.splits
    }
    for split, image_set in sets.items():
        if len(image_set) == 0:
            raise SourceFormatError(f"{config.source}: split {split!r} of {config.dataset} is empty")
    try:
        known = {(r.split, r.shard_index): r for r in read_manifest(config.out, config.storage_options)}
    except ManifestError:
        known = {}
    _remove_partials(config.out, config.storage_options)

    tasks = []
    for split, image_set in sets.items():
        order = storage_order(split, len(image_set), config.episode_length, config.seed)
        for shard_index, start in enumerate(range(0, len(order), config.shard_size)):
            rows = order[start : start + config.shard_size]
            arrays = ShardArrays(image_set.images[rows], rows.astype(np.int64),
                                 None if image_set.labels is None else image_set.labels[rows])
            tasks.append(ShardTask(config.out, split, shard_index, arrays, config.block_size, image_set.bit_depth,
                                   config.compress, known.get((split, shard_index)), config.storage_options))

    progress = PrepareProgress(f"prepare {config.dataset} -> {config.out}", len(tasks), config.progress)
    results = []
    if config.workers == 1:
        for task in tasks:
            results.append(write_shard(task))
            progress.advance(results[-1][1])
    else:
        with ProcessPoolExecutor(config.workers, mp_context=get_context("spawn")) as pool:
            for result in pool.map(write_shard, tasks):
                results.append(result)
                progress.advance(result[1])
    records = [record for record, _ in results]
    write_card(config.out, _card(config, sets, records), config.storage_options)
    if all(t.arrays.labels is not None for t in tasks):
        write_labels(config.out, {(t.split, t.shard_index): t.arrays.labels.tolist() for t in tasks},
                     config.storage_options)
    write_manifest(config.out, records, config.storage_options)
    skipped = sum(skip for _, skip in results)
    return PrepareReport(records, written=len(results) - skipped, skipped=skipped)

