"""The fixed binarization of MNIST (Salakhutdinov & Murray 2008, Larochelle's files): 50k/10k/10k, no labels.

Either one `binarized_mnist.npz` (x_train, x_valid, x_test; loaded with allow_pickle=False, never unpickled)
or the three text files `binarized_mnist_{train,valid,test}.amat[.gz]` (one image per line, 784 values 0/1).
`source` is the directory holding them or the .npz file itself.
"""
from __future__ import annotations

import io

import numpy as np

from pipeline.data.sources.errors import SourceFormatError, SourceNotFoundError
from pipeline.data.sources.files import read_bytes
from pipeline.data.sources.image_set import ImageSet
from pipeline.storage import filesystem, join

NPZ_NAME = "binarized_mnist.npz"
PIXELS = 28 * 28
# Larochelle's layout: every value is one character followed by one separator (space, or '\n' at line end).
AMAT_LINE_BYTES = 2 * PIXELS


def parse_amat(data: bytes, path: str) -> np.ndarray:
    """uint8 [N, 784] in {0, 1} from .amat text; vectorised for the canonical single-char layout."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if raw.size and raw.size % AMAT_LINE_BYTES == 0:
        lines = raw.reshape(-1, AMAT_LINE_BYTES)
        values, seps = lines[:, 0::2], lines[:, 1::2]
        if (
            np.isin(values, (ord("0"), ord("1"))).all()
            and (seps[:, :-1] == ord(" ")).all()
            and (seps[:, -1] == ord("\n")).all()
        ):
            return values - np.uint8(ord("0"))
    # Any other spacing (e.g. "0.0 1.0", CRLF): parse generally, then check the shape and values.
    rows = [r for r in data.decode("ascii", errors="replace").splitlines() if r.strip()]
    try:
        flat = np.array(" ".join(rows).split(), dtype=np.float32)
    except ValueError as err:
        raise SourceFormatError(f"{path}: not .amat text of 0/1 values ({err})") from err
    if not rows or flat.size != len(rows) * PIXELS:
        raise SourceFormatError(f"{path}: expected lines of {PIXELS} values, got {flat.size} values on {len(rows)} lines")
    return check_binary(flat.reshape(len(rows), PIXELS), path)


def check_binary(array: np.ndarray, where: str) -> np.ndarray:
    if array.size == 0:
        raise SourceFormatError(f"{where}: no images (empty split)")
    # uint8 needs one comparison; other dtypes (float 0.0/1.0) need the exact membership test.
    valid = (array <= 1).all() if array.dtype == np.uint8 else np.isin(array, (0, 1)).all()
    if not valid:
        raise SourceFormatError(f"{where}: values other than 0 and 1; expected the fixed binarization")
    return array.astype(np.uint8)


def load_binarized_mnist_split(source: str, split: str, storage_options: dict | None = None) -> ImageSet:
    fs, base = filesystem(source, storage_options)
    npz_path = base if base.endswith(".npz") else join(base, NPZ_NAME)
    if fs.isfile(npz_path):
        with np.load(io.BytesIO(read_bytes(fs, npz_path)), allow_pickle=False) as npz:
            key = f"x_{split}"
            if key not in npz.files:
                raise SourceFormatError(f"{npz_path}: no array '{key}' (has {sorted(npz.files)})")
            where = f"{npz_path}[{key}]"
            array = npz[key]
    else:
        stem = f"binarized_mnist_{split}.amat"
        candidates = [join(base, stem + ".gz"), join(base, stem)]
        found = [p for p in candidates if fs.isfile(p)]
        if not found:
            raise SourceNotFoundError(f"{source}: neither {NPZ_NAME} nor {stem}[.gz] found there")
        where = found[0]
        array = parse_amat(read_bytes(fs, where), where)
    if array.ndim not in (2, 3) or array.shape[0] == 0 or int(np.prod(array.shape[1:])) != PIXELS:
        raise SourceFormatError(f"{where}: shape {array.shape}, expected [N, 784] or [N, 28, 28] with N > 0")
    images = check_binary(array, where).reshape(-1, 1, 28, 28)
    return ImageSet(images=np.ascontiguousarray(images), labels=None, bit_depth=1, name=f"binarized_mnist/{split}")
