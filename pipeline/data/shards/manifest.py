"""The Parquet manifest (one row per committed shard) and the JSON dataset card beside it.

Layout of a prepared dataset at URL `out`:
    out/manifest.parquet         split, shard_index, path (relative to out), url, num_samples, num_bytes, sha256
    out/dataset.json             the dataset card: shapes, dtype, bit depth, split sizes, binarization,
                                 source checksums, episode construction and seeds
    out/labels.parquet           datasets with labels: split, shard_index, labels (the shard's, in row order),
                                 so a reader can plan episodes of one class without fetching every shard
    out/<split>/<split>-NNNNN.tar
Both files are written to a temporary name and moved into place last: a dataset without manifest.parquet is
not prepared, whatever shards lie beside it. Readers trust only the manifest, never a directory listing.
"""
from __future__ import annotations

import io
import json
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.storage import filesystem, join
from pipeline.retry import with_retries

MANIFEST_NAME = "manifest.parquet"
CARD_NAME = "dataset.json"
LABELS_NAME = "labels.parquet"
LABELS_SCHEMA = pa.schema([("split", pa.string()), ("shard_index", pa.int32()), ("labels", pa.list_(pa.int64()))])

SCHEMA = pa.schema(
    [
        ("split", pa.string()),
        ("shard_index", pa.int32()),
        ("path", pa.string()),
        ("url", pa.string()),
        ("num_samples", pa.int64()),
        ("num_bytes", pa.int64()),
        ("sha256", pa.string()),
    ]
)


class ManifestError(ValueError):
    """A manifest or card that is missing or inconsistent; the message names the file."""


@dataclass(frozen=True)
class ShardRecord:
    split: str
    shard_index: int
    path: str  # relative to the dataset root
    url: str   # where it was written (informational; readers resolve `path` against the manifest's location)
    num_samples: int
    num_bytes: int
    sha256: str


def _atomic_write(url: str, data: bytes, storage_options: dict | None) -> None:
    fs, path = filesystem(url, storage_options)

    def write() -> None:
        temporary = f"{path}.partial-{uuid.uuid4().hex}"
        fs.pipe_file(temporary, data)
        fs.mv(temporary, path)

    with_retries(f"write {url}", write)


def _parquet(data: bytes) -> pa.Table:
    """A small Parquet file read from Arrow-owned memory, in this thread, without pre-buffering.

    Read from a Python object (io.BytesIO, or pa.py_buffer over bytes), Arrow holds `PyBuffer`s that its I/O
    threads may release while the interpreter shuts down; the release takes the GIL, the thread is torn down and
    the process aborts after its work is done (`terminate called without an active exception`, exit -6:
    apache/arrow#34314, #50482). Measured here (pyarrow 25.0.1, 4 processes at once, 3 reads and an exit):
    BytesIO with use_threads=False 13 of 60 runs aborted, adding pre_buffer=False 5 of 60, a copy into an
    Arrow buffer 0 of 180. The copy costs one memcpy of a file of a few kB."""
    owned = pa.BufferOutputStream()
    owned.write(data)
    return pq.read_table(pa.BufferReader(owned.getvalue()), use_threads=False, pre_buffer=False)


def write_manifest(root: str, records: list[ShardRecord], storage_options: dict | None = None) -> None:
    table = pa.Table.from_pylist([asdict(r) for r in records], schema=SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _atomic_write(join(root, MANIFEST_NAME), buffer.getvalue(), storage_options)


def read_manifest(root: str, storage_options: dict | None = None) -> list[ShardRecord]:
    fs, base = filesystem(root, storage_options)
    path = join(base, MANIFEST_NAME)
    try:
        data = with_retries(f"read {join(root, MANIFEST_NAME)}", lambda: fs.cat_file(path))
    except FileNotFoundError as err:
        raise ManifestError(f"{join(root, MANIFEST_NAME)}: no manifest; the dataset was not (completely) prepared") from err
    try:
        table = _parquet(data)
    except pa.ArrowException as err:
        raise ManifestError(f"{join(root, MANIFEST_NAME)}: not a readable Parquet manifest ({err})") from err
    missing = set(SCHEMA.names) - set(table.column_names)
    if missing:
        raise ManifestError(f"{join(root, MANIFEST_NAME)}: columns {sorted(missing)} missing")
    return [ShardRecord(**row) for row in table.select(SCHEMA.names).to_pylist()]


def write_card(root: str, card: dict[str, Any], storage_options: dict | None = None) -> None:
    _atomic_write(join(root, CARD_NAME), json.dumps(card, indent=2, sort_keys=True).encode(), storage_options)


@dataclass(frozen=True)
class DataCard:
    """What the pipeline reads of a dataset card (dataset.json); the whole JSON stays in `raw` for the rest
    (source checksums, binarization, seeds). episode_length: that of the stored fixed evaluation episodes, None
    for a card from before it was recorded."""
    dataset: str
    image_shape: tuple[int, int, int]
    bit_depth: int
    has_labels: bool
    num_images: dict[str, int]  # per split
    episode_length: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, card: dict[str, Any], where: str) -> "DataCard":
        """ManifestError naming `where` and the field when a field is missing or of the wrong kind."""
        def get(path: str, convert):
            value: Any = card
            for key in path.split("."):
                if not isinstance(value, dict) or key not in value:
                    raise ManifestError(f"{where}: field {path!r} missing")
                value = value[key]
            try:
                return convert(value)
            except (TypeError, ValueError) as err:
                raise ManifestError(f"{where}: field {path!r} is {value!r} ({err})") from None
        shape = get("image_shape", lambda v: tuple(int(x) for x in v))
        if len(shape) != 3:
            raise ManifestError(f"{where}: field 'image_shape' is {list(shape)}, expected [C, H, W]")
        splits = get("splits", dict)
        episodes = card.get("episodes") or {}
        return cls(dataset=str(card.get("dataset", "")), image_shape=shape, bit_depth=get("bit_depth", int),
                   has_labels=bool(card.get("has_labels", False)),
                   num_images={split: get(f"splits.{split}.num_images", int) for split in splits},
                   episode_length=int(episodes["episode_length"]) if "episode_length" in episodes else None,
                   raw=card)


def read_card(root: str, storage_options: dict | None = None) -> DataCard:
    fs, base = filesystem(root, storage_options)
    where = join(root, CARD_NAME)
    try:
        text = with_retries(f"read {where}", lambda: fs.cat_file(join(base, CARD_NAME)))
    except FileNotFoundError as err:
        raise ManifestError(f"{where}: no dataset card") from err
    try:
        card = json.loads(text)
    except ValueError as err:
        raise ManifestError(f"{where}: not valid JSON ({err})") from None
    if not isinstance(card, dict):
        raise ManifestError(f"{where}: not a JSON object")
    return DataCard.from_dict(card, where)


def write_labels(root: str, labels: dict[tuple[str, int], list[int]], storage_options: dict | None = None) -> None:
    """The label index: {(split, shard_index): labels of that shard's rows}."""
    rows = [{"split": split, "shard_index": index, "labels": list(map(int, values))}
            for (split, index), values in sorted(labels.items())]
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=LABELS_SCHEMA), buffer)
    _atomic_write(join(root, LABELS_NAME), buffer.getvalue(), storage_options)


def read_labels(root: str, split: str, storage_options: dict | None = None) -> dict[int, list[int]]:
    """{shard_index: labels} of one split, from the label index."""
    return read_label_index(root, storage_options).get(split, {})


def read_label_index(root: str, storage_options: dict | None = None) -> dict[str, dict[int, list[int]]]:
    """{split: {shard_index: labels}}: the whole label index in one read."""
    fs, base = filesystem(root, storage_options)
    url = join(root, LABELS_NAME)
    try:
        data = with_retries(f"read {url}", lambda: fs.cat_file(join(base, LABELS_NAME)))
    except FileNotFoundError as err:
        raise ManifestError(f"{url}: no label index; episodes of one class need a dataset with labels, prepared "
                            "by this version of jobs.prepare (re-run it: valid shards are kept)") from err
    try:
        table = _parquet(data)
    except pa.ArrowException as err:
        raise ManifestError(f"{url}: not a readable Parquet label index ({err})") from err
    index: dict[str, dict[int, list[int]]] = {}
    for r in table.to_pylist():
        index.setdefault(r["split"], {})[int(r["shard_index"])] = r["labels"]
    return index
