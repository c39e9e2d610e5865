"""Dataset sources: each split of each dataset as an in-memory ImageSet (uint8 [N, C, H, W]).

    load_split(dataset, source, split) -> ImageSet

dataset  "mnist", "fashion_mnist"  original IDX files (.gz or not) under `source`; bit_depth 8;
                                   valid = last 10,000 of the 60,000 train images, train = the first 50,000.
                                   Option binarize=True: a fixed seeded Bernoulli draw (p = grey level), bit_depth
                                   1, labels kept (binarized_mnist has none).
         "binarized_mnist"         fixed binarization, binarized_mnist.npz or binarized_mnist_{split}.amat[.gz];
                                   50k/10k/10k, bit_depth 1, no labels.
         "digits"                  scikit-learn's bundled 8x8 digits, resized to 28x28 and binarized with a fixed
                                   seed; 1397/200/200; source must be None (the offline default).
         "omniglot"                official images_background/images_evaluation PNG layout; bit_depth 1; option
                                   resize=N (e.g. 28); see pipeline.data.sources.omniglot for the splits.
         "cifar10"                 the binary release data_batch_N.bin/test_batch.bin; 40k/10k/10k by file.
         "folder"                  <source>/<split>/<class>/<image>; options resize, channels.
         "npz"                     a .npz of x_<split> (and y_<split>); option bit_depth.
source   a local directory or any fsspec URL (file://, s3://); S3 settings from the AWS environment variables
         or `storage_options`.
split    "train", "valid" or "test".

Bad input raises SourceNotFoundError (a FileNotFoundError) or SourceFormatError (a ValueError); both are
DataSourceError and name the file and what was expected.
"""
from __future__ import annotations

from typing import Any

from pipeline.data.sources.errors import DataSourceError, SourceFormatError, SourceNotFoundError
from pipeline.data.sources.image_set import ImageSet

SPLITS = ("train", "valid", "test")
DATASETS = ("mnist", "fashion_mnist", "binarized_mnist", "digits", "omniglot", "cifar10", "folder", "npz")
DATASET_OPTIONS: dict[str, tuple[str, ...]] = {"omniglot": ("resize",), "folder": ("resize", "channels"),
                                               "npz": ("bit_depth",), "mnist": ("binarize",),
                                               "fashion_mnist": ("binarize",)}

__all__ = [
    "DATASETS",
    "SPLITS",
    "DataSourceError",
    "ImageSet",
    "SourceFormatError",
    "SourceNotFoundError",
    "load_split",
]


def load_split(
    dataset: str, source: str | None, split: str, storage_options: dict[str, Any] | None = None, **options: Any
) -> ImageSet:
    """One split of one dataset, validated; see the module docstring for datasets, sources and splits.

    `options` are dataset-specific (e.g. resize=28 for omniglot); an option the dataset does not take is an error.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {dataset!r}")
    allowed = DATASET_OPTIONS.get(dataset, ())
    unknown = set(options) - set(allowed)
    if unknown:
        raise ValueError(f"dataset {dataset!r} takes options {list(allowed)}, got unknown {sorted(unknown)}")
    if dataset == "digits":
        if source is not None:
            raise ValueError(f"dataset 'digits' is bundled with scikit-learn and takes no source, got {source!r}")
        from pipeline.data.sources.digits import load_digits_split

        return load_digits_split(split)
    if source is None:
        raise ValueError(f"dataset {dataset!r} needs a source (a directory or fsspec URL holding its files)")
    source = str(source)
    if dataset == "binarized_mnist":
        from pipeline.data.sources.binarized_mnist import load_binarized_mnist_split

        return load_binarized_mnist_split(source, split, storage_options)
    if dataset == "omniglot":
        from pipeline.data.sources.omniglot import load_omniglot_split

        return load_omniglot_split(source, split, storage_options, **options)
    if dataset == "cifar10":
        from pipeline.data.sources.cifar10 import load_cifar10_split

        return load_cifar10_split(source, split, storage_options)
    if dataset == "folder":
        from pipeline.data.sources.folder import load_folder_split

        return load_folder_split(source, split, storage_options, **options)
    if dataset == "npz":
        from pipeline.data.sources.npz import load_npz_split

        return load_npz_split(source, split, storage_options, **options)
    from pipeline.data.sources.idx import load_idx_split

    return load_idx_split(dataset, source, split, storage_options, **options)
