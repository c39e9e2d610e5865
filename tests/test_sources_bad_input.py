"""Bad input to the IDX and binarized-MNIST sources: each error is of our type and names the file and the
expectation. The files are written here, byte by byte, in the IDX layout."""
import gzip

import numpy as np
import pytest

from pipeline.data.sources import DataSourceError, SourceFormatError, SourceNotFoundError, load_split


def idx_bytes(magic: int, dims: tuple[int, ...], payload: bytes) -> bytes:
    return magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims) + payload


def write_idx_pair(folder, count=3, size=28, label_count=None, image_magic=0x803, cut=0, compress=False):
    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(count * size * size, dtype=np.uint8).tobytes()
    images = idx_bytes(image_magic, (count, size, size), pixels)
    labels = idx_bytes(0x801, (label_count if label_count is not None else count,), bytes(range(label_count or count)))
    images = images[: len(images) - cut]
    suffix = ".gz" if compress else ""
    for stem, data in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        (folder / (stem + suffix)).write_bytes(gzip.compress(data) if compress else data)
    return folder


def test_a_valid_tiny_idx_pair_loads_uncompressed_and_gzipped(tmp_path):
    for compress in (False, True):
        folder = write_idx_pair(tmp_path / str(compress), count=3, compress=compress)
        test = load_split("mnist", folder, "test")
        assert test.images.shape == (3, 1, 28, 28) and test.labels.tolist() == [0, 1, 2]
        assert test.images.reshape(-1)[:5].tolist() == [0, 1, 2, 3, 4]


def test_missing_directory_and_missing_file(tmp_path):
    with pytest.raises(SourceNotFoundError, match="source directory not found") as err:
        load_split("mnist", tmp_path / "nowhere", "test")
    assert isinstance(err.value, FileNotFoundError) and "nowhere" in str(err.value)
    folder = write_idx_pair(tmp_path / "d")
    (folder / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(SourceNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_split("mnist", folder, "test")


def test_wrong_magic_names_file_and_expected_magic(tmp_path):
    folder = write_idx_pair(tmp_path, image_magic=0x801)
    with pytest.raises(SourceFormatError, match=r"t10k-images-idx3-ubyte: IDX magic 0x00000801, expected 0x00000803"):
        load_split("mnist", folder, "test")


def test_not_an_idx_file_at_all(tmp_path):
    folder = write_idx_pair(tmp_path)
    (folder / "t10k-images-idx3-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(SourceFormatError, match="t10k-images-idx3-ubyte: IDX magic"):
        load_split("mnist", folder, "test")


def test_truncated_images_name_the_file(tmp_path):
    folder = write_idx_pair(tmp_path, count=3, cut=100)
    with pytest.raises(SourceFormatError, match=r"t10k-images-idx3-ubyte: 2252 data bytes.*expected 2352.*truncated"):
        load_split("mnist", folder, "test")


def test_truncated_gzip_stream(tmp_path):
    folder = write_idx_pair(tmp_path, compress=True)
    path = folder / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(SourceFormatError, match=r"t10k-images-idx3-ubyte.gz: truncated or corrupt gzip"):
        load_split("mnist", folder, "test")


def test_label_count_mismatch(tmp_path):
    folder = write_idx_pair(tmp_path, count=3, label_count=2)
    with pytest.raises(SourceFormatError, match=r"t10k-labels-idx1-ubyte: 2 labels, expected one per image.*\(3\)"):
        load_split("mnist", folder, "test")


def test_wrong_image_size(tmp_path):
    folder = write_idx_pair(tmp_path, size=32)
    with pytest.raises(SourceFormatError, match=r"t10k-images-idx3-ubyte: images of shape \(32, 32\), expected \(28, 28\)"):
        load_split("fashion_mnist", folder, "test")


def test_empty_split(tmp_path):
    folder = write_idx_pair(tmp_path, count=0)
    with pytest.raises(SourceFormatError, match="no images"):
        load_split("mnist", folder, "test")


def test_train_file_too_small_to_carve_validation(tmp_path):
    folder = tmp_path / "small"
    write_idx_pair(folder, count=3)
    for kind in ("images-idx3", "labels-idx1"):
        (folder / f"t10k-{kind}-ubyte").rename(folder / f"train-{kind}-ubyte")
    with pytest.raises(SourceFormatError, match="need more than 10000"):
        load_split("mnist", folder, "valid")


def test_binarized_npz_with_wrong_values_shape_or_key(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", x_train=np.full((2, 784), 2, np.uint8), x_test=np.zeros((2, 27, 27), np.uint8))
    with pytest.raises(SourceFormatError, match=r"binarized_mnist.npz\[x_train\]: values other than 0 and 1"):
        load_split("binarized_mnist", tmp_path, "train")
    with pytest.raises(SourceFormatError, match=r"binarized_mnist.npz\[x_test\]: shape \(2, 27, 27\)"):
        load_split("binarized_mnist", tmp_path, "test")
    with pytest.raises(SourceFormatError, match=r"binarized_mnist.npz: no array 'x_valid'"):
        load_split("binarized_mnist", tmp_path, "valid")


def test_binarized_npz_holding_a_pickle_is_refused(tmp_path):
    np.savez(tmp_path / "binarized_mnist.npz", x_test=np.array([{"a": 1}], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_split("binarized_mnist", tmp_path, "test")


def test_binarized_amat_variants_and_bad_text(tmp_path):
    # Non-canonical spacing ("0.0 1.0", CRLF) still parses; wrong value counts do not.
    row = " ".join(["1.0"] + ["0.0"] * 783)
    (tmp_path / "binarized_mnist_valid.amat").write_text(row + "\r\n" + row + "\r\n")
    valid = load_split("binarized_mnist", tmp_path, "valid")
    assert valid.images.shape == (2, 1, 28, 28) and valid.images.sum() == 2
    (tmp_path / "binarized_mnist_test.amat").write_text("0 1 0\n")
    with pytest.raises(SourceFormatError, match=r"binarized_mnist_test.amat: expected lines of 784 values"):
        load_split("binarized_mnist", tmp_path, "test")
    with pytest.raises(SourceNotFoundError, match=r"binarized_mnist_train.amat\[.gz\]"):
        load_split("binarized_mnist", tmp_path, "train")


def test_all_source_errors_share_one_base(tmp_path):
    with pytest.raises(DataSourceError):
        load_split("binarized_mnist", tmp_path / "missing", "train")
