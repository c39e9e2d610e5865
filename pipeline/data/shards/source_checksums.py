"""sha256 of the source files a dataset was prepared from, for the dataset card.

Files directly under the source directory are hashed one by one. Directory trees (Omniglot, image folders; tens
of thousands of small files) get one sha256 over their sorted "relative-path size" listing instead: it changes
when a file is added, removed or resized, at the cost of a listing, not of reading every file.
"""
from __future__ import annotations

import hashlib
from typing import Any

from pipeline.storage import filesystem


def _sha256_file(fs, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def source_checksums(dataset: str, source: str | None, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    if source is None:
        if dataset == "digits":
            import sklearn
            from importlib.resources import files

            data = (files("sklearn.datasets") / "data" / "digits.csv.gz").read_bytes()
            return {f"sklearn-{sklearn.__version__}/datasets/data/digits.csv.gz": hashlib.sha256(data).hexdigest()}
        return {}
    fs, root = filesystem(source, storage_options)
    if fs.isfile(root):
        return {root.rsplit("/", 1)[-1]: _sha256_file(fs, root)}
    checksums, tree = {}, []
    for path, info in sorted(fs.find(root, detail=True).items()):
        relative = path[len(root.rstrip("/")) + 1 :]
        if "/" in relative:
            tree.append(f"{relative} {info.get('size')}")
        else:
            checksums[relative] = _sha256_file(fs, path)
    if tree:
        checksums["tree_listing_sha256"] = hashlib.sha256("\n".join(tree).encode()).hexdigest()
        checksums["tree_num_files"] = str(len(tree))
    return checksums
