"""The shard format: packed blocks round-trip, bytes are deterministic, stock WebDataset reads the tars, and
damaged bytes give errors naming the shard."""
import io

import numpy as np
import pytest
import webdataset as wds

from pipeline.data.shards.format import ShardArrays, ShardFormatError, decode_shard, encode_shard
from pipeline.data.shards.tar_index import TarIndexError, npy_from_view

RNG = np.random.default_rng(0)


def arrays(n=1234, channels=1, size=28, binary=False, labels=True):
    images = RNG.integers(0, 2 if binary else 256, size=(n, channels, size, size), dtype=np.uint8)
    return ShardArrays(images, RNG.permutation(10 * n)[:n].astype(np.int64),
                       RNG.integers(0, 10, n).astype(np.int64) if labels else None)


@pytest.mark.parametrize("binary, channels, labels", [(False, 1, True), (True, 1, False), (False, 3, True), (True, 3, True)])
def test_round_trip(binary, channels, labels):
    original = arrays(channels=channels, size=30 if binary else 28, binary=binary, labels=labels)
    data = encode_shard("train", 3, original, block_size=100, bit_depth=1 if binary else 8)
    decoded = decode_shard(data, "train-00003.tar", original.images.shape[1:])
    np.testing.assert_array_equal(decoded.images, original.images)
    np.testing.assert_array_equal(decoded.keys, original.keys)
    assert (decoded.labels is None) == (not labels)
    if labels:
        np.testing.assert_array_equal(decoded.labels, original.labels)


@pytest.mark.parametrize("bit_depth", [1, 8])
def test_compressed_shards_round_trip_and_stock_webdataset_decodes_them(tmp_path, bit_depth):
    # Mostly background, like real digits (random noise everywhere would not compress).
    original = arrays(n=300, binary=bit_depth == 1)
    original.images[:, :, 6:] = 0
    plain = encode_shard("train", 0, original, 100, bit_depth)
    packed = encode_shard("train", 0, original, 100, bit_depth, compress=True)
    # (binary: the uncompressed int64 keys and labels are most of what is left)
    assert len(packed) < len(plain) * (0.5 if bit_depth == 8 else 0.8)
    assert packed == encode_shard("train", 0, original, 100, bit_depth, compress=True)
    decoded = decode_shard(packed, "train-00000.tar", original.images.shape[1:])
    np.testing.assert_array_equal(decoded.images, original.images)
    if bit_depth == 8:
        path = tmp_path / "train-00000.tar"
        path.write_bytes(packed)
        samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
        assert "images.npy.gz" in samples[0]
        np.testing.assert_array_equal(np.concatenate([s["images.npy.gz"] for s in samples]), original.images)


def test_corrupt_gzip_member_is_named():
    data = bytearray(encode_shard("train", 0, arrays(n=100), 100, 8, compress=True))
    start = data.index(b"\x1f\x8b")
    data[start + 40 : start + 60] = bytes(20)  # inside the deflate stream; tar headers stay intact
    with pytest.raises(ShardFormatError, match=r"train-00000.tar:train_00000_0000.images.npy.gz: corrupt gzip"):
        decode_shard(bytes(data), "train-00000.tar", (1, 28, 28))


def test_binary_images_are_packed_eightfold():
    binary = arrays(n=1000, binary=True, labels=False)
    packed = len(encode_shard("t", 0, binary, 500, bit_depth=1))
    unpacked = len(encode_shard("t", 0, binary, 500, bit_depth=8))
    assert packed < unpacked / 5


def test_same_content_gives_same_bytes():
    content = arrays()
    assert encode_shard("train", 0, content, 256, 8) == encode_shard("train", 0, content, 256, 8)


def test_stock_webdataset_reads_a_shard(tmp_path):
    content = arrays(n=250)
    path = tmp_path / "train-00000.tar"
    path.write_bytes(encode_shard("train", 0, content, block_size=100, bit_depth=8))
    samples = list(wds.WebDataset(str(path), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples] == ["train_00000_0000", "train_00000_0001", "train_00000_0002"]
    np.testing.assert_array_equal(np.concatenate([s["images.npy"] for s in samples]), content.images)
    np.testing.assert_array_equal(np.concatenate([s["keys.npy"] for s in samples]), content.keys)


def test_truncated_shard_names_it():
    data = encode_shard("train", 0, arrays(n=300), 100, 8)
    for cut in (len(data) // 2, 700):
        with pytest.raises(ShardFormatError, match=r"train-00000.tar: .*truncated"):
            decode_shard(data[:cut], "train-00000.tar", (1, 28, 28))


def test_damaged_header_is_caught_by_its_checksum():
    data = bytearray(encode_shard("train", 0, arrays(n=300), 100, 8))
    data[10] ^= 0xFF  # inside the first member's name
    with pytest.raises(ShardFormatError, match=r"train-00000.tar: tar header checksum mismatch at byte 0"):
        decode_shard(bytes(data), "train-00000.tar", (1, 28, 28))


def test_not_a_tar_and_wrong_image_shape():
    with pytest.raises(ShardFormatError, match="x.tar"):
        decode_shard(b"<Error><Code>NoSuchKey</Code></Error>" + bytes(600), "x.tar", (1, 28, 28))
    data = encode_shard("train", 0, arrays(n=10), 100, 8)
    with pytest.raises(ShardFormatError, match=r"x.tar: images of shape \(1, 28, 28\), dataset card says \(3, 28, 28\)"):
        decode_shard(data, "x.tar", (3, 28, 28))


def test_object_npy_member_is_refused():
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(TarIndexError, match="objects"):
        npy_from_view(memoryview(buffer.getvalue()), "m.npy")


def test_a_damaged_dataset_card_is_named_with_its_field(tmp_path):
    """The card is read into a typed DataCard: a missing or malformed field is a ManifestError naming the file
    and the field, not a KeyError deep in the reader or the preflight."""
    import json

    import pytest

    from pipeline.data.shards.manifest import ManifestError, read_card
    good = {"dataset": "digits", "image_shape": [1, 8, 8], "bit_depth": 1, "has_labels": True,
            "splits": {"train": {"num_images": 100}, "test": {"num_images": 20}}, "episodes": {"episode_length": 4}}
    (tmp_path / "dataset.json").write_text(json.dumps(good))
    card = read_card(str(tmp_path))
    assert (card.image_shape, card.bit_depth, card.num_images, card.episode_length) == ((1, 8, 8), 1,
                                                                                       {"train": 100, "test": 20}, 4)
    for broken, message in (({k: v for k, v in good.items() if k != "bit_depth"}, "field 'bit_depth' missing"),
                            ({**good, "image_shape": [8, 8]}, r"field 'image_shape' is \[8, 8\], expected \[C, H, W\]"),
                            ({**good, "splits": {"train": {}}}, "field 'splits.train.num_images' missing"),
                            ({**good, "bit_depth": "one"}, "field 'bit_depth' is 'one'")):
        (tmp_path / "dataset.json").write_text(json.dumps(broken))
        with pytest.raises(ManifestError, match=f"dataset.json: {message}"):
            read_card(str(tmp_path))
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(ManifestError, match="dataset.json: not valid JSON"):
        read_card(str(tmp_path))
