"""Dataset sources against the real files in ../shared/data (figures from its README) and a file:// URL."""
import numpy as np
import pytest

from pipeline.data.sources import ImageSet, load_split

MNIST_TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def pixel_mean(*sets: ImageSet) -> float:
    total = sum(float(s.images.sum(dtype=np.int64)) for s in sets)
    count = sum(s.images.size for s in sets)
    return total / count / (255.0 if sets[0].bit_depth == 8 else 1.0)


def test_mnist_splits_match_the_release(shared_data):
    train, valid, test = (load_split("mnist", shared_data / "mnist", s) for s in ("train", "valid", "test"))
    assert (len(train), len(valid), len(test)) == (50_000, 10_000, 10_000)
    assert train.images.shape[1:] == (1, 28, 28) and train.images.dtype == np.uint8 and train.bit_depth == 8
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert test.labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    # train + valid are exactly the 60,000 released training images: README's mean and label counts.
    assert pixel_mean(train, valid) == pytest.approx(0.130660, abs=1e-6)
    assert pixel_mean(test) == pytest.approx(0.132515, abs=1e-6)
    assert np.bincount(np.concatenate([train.labels, valid.labels])).tolist() == MNIST_TRAIN_LABEL_COUNTS
    assert np.bincount(test.labels).tolist() == MNIST_TEST_LABEL_COUNTS
    assert train.images.max() == 255 and train.name == "mnist/train"


def test_fashion_mnist_from_a_file_url(shared_data):
    url = (shared_data / "fashion_mnist").as_uri()
    assert url.startswith("file://")
    train, valid, test = (load_split("fashion_mnist", url, s) for s in ("train", "valid", "test"))
    assert pixel_mean(train, valid) == pytest.approx(0.286041, abs=1e-6)
    assert pixel_mean(test) == pytest.approx(0.286849, abs=1e-6)
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert np.bincount(np.concatenate([train.labels, valid.labels])).tolist() == [6000] * 10


def test_binarized_mnist_npz_and_amat_agree(shared_data, tmp_path):
    source = shared_data / "binarized_mnist"
    npz = {s: load_split("binarized_mnist", source, s) for s in ("train", "valid", "test")}
    assert [len(npz[s]) for s in npz] == [50_000, 10_000, 10_000]
    assert pixel_mean(npz["train"]) == pytest.approx(0.130562, abs=1e-6)
    assert pixel_mean(npz["valid"]) == pytest.approx(0.131127, abs=1e-6)
    assert pixel_mean(npz["test"]) == pytest.approx(0.132512, abs=1e-6)
    assert npz["test"].labels is None and npz["test"].bit_depth == 1 and set(np.unique(npz["test"].images)) == {0, 1}
    # Without the .npz beside them the .amat.gz files are read; they hold the same images in the same order.
    (tmp_path / "binarized_mnist_test.amat.gz").symlink_to(source / "binarized_mnist_test.amat.gz")
    amat = load_split("binarized_mnist", tmp_path, "test")
    np.testing.assert_array_equal(amat.images, npz["test"].images)


def test_binarized_mnist_from_the_npz_file_itself(shared_data):
    direct = load_split("binarized_mnist", (shared_data / "binarized_mnist" / "binarized_mnist.npz").as_uri(), "valid")
    assert direct.images.shape == (10_000, 1, 28, 28)


def test_digits_default_is_fixed_binary_and_split(shared_data):
    splits = {s: load_split("digits", None, s) for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [1397, 200, 200]
    for image_set in splits.values():
        assert image_set.images.shape[1:] == (1, 28, 28) and image_set.bit_depth == 1
        assert set(np.unique(image_set.images)) == {0, 1}
    again = load_split("digits", None, "test")
    np.testing.assert_array_equal(again.images, splits["test"].images)
    # The three splits partition the 1,797 digits: every class is present and the label total adds up.
    counts = sum(np.bincount(splits[s].labels, minlength=10) for s in splits)
    assert counts.sum() == 1797 and (counts > 150).all()
    # Binarization keeps the digit: ink density is well inside (0, 1) and differs between classes.
    assert 0.1 < splits["train"].images.mean() < 0.5


def test_unknown_dataset_split_or_missing_source_are_named():
    with pytest.raises(ValueError, match="dataset must be one of"):
        load_split("cifar100", "/x", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        load_split("mnist", "/x", "validation")
    with pytest.raises(ValueError, match="needs a source"):
        load_split("mnist", None, "train")


def test_mnist_binarized_by_a_fixed_draw_keeps_labels(shared_data):
    grey = load_split("mnist", shared_data / "mnist", "test")
    binary = load_split("mnist", shared_data / "mnist", "test", binarize=True)
    assert binary.bit_depth == 1 and set(np.unique(binary.images).tolist()) == {0, 1}
    np.testing.assert_array_equal(binary.labels, grey.labels)
    # Bernoulli(grey / 255): ink only where there is grey ink, and the same mean as the grey levels.
    assert not np.any(binary.images[grey.images == 0])
    assert pixel_mean(binary) == pytest.approx(pixel_mean(grey), abs=2e-3)
    np.testing.assert_array_equal(binary.images, load_split("mnist", shared_data / "mnist", "test", binarize=True).images)
