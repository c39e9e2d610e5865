"""What a job's data settings ask of a prepared dataset, checked from its card and label index before any worker.

Every condition a training worker would otherwise find out (after the cluster started, and then retried as a
crash) is a function of counts the prepared dataset already records: images per split (dataset.json) and, for
episodes of one class, each class's size per split (labels.parquet). `check` reads nothing else: no shard.

    check(DataRequest(...), card, labels)  -> None, or DataPlanError naming the field, the split and the numbers
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass


class DataPlanError(ValueError):
    """A data setting the prepared dataset cannot serve. The message starts with the field ("data.episodes: ...")."""


@dataclass(frozen=True)
class DataRequest:
    """The job's data settings, in the terms of the prepared dataset."""
    root: str             # the dataset's URL (named in messages)
    episodes: str         # "random" or "class"
    episode_length: int   # T
    batch_episodes: int   # B, per rank
    world_size: int
    valid_episodes: int
    test_episodes: int


@dataclass(frozen=True)
class SplitEpisodes:
    """How many whole episodes of T a split gives, and why (for the message)."""
    split: str
    num_images: int
    episodes: int
    largest_class: int | None = None  # class episodes only
    num_classes: int | None = None


def split_episodes(split: str, num_images: int, episode_length: int, class_sizes: Counter | None) -> SplitEpisodes:
    """Random episodes: num_images // T (the tail is dropped). Class episodes: the sum over classes of n_c // T
    (pipeline.data.episodes.class_episodes drops each class's tail)."""
    if class_sizes is None:
        return SplitEpisodes(split, num_images, num_images // episode_length)
    return SplitEpisodes(split, num_images, sum(n // episode_length for n in class_sizes.values()),
                         max(class_sizes.values(), default=0), len(class_sizes))


def check(req: DataRequest, card, class_sizes: dict[str, Counter] | None) -> dict[str, SplitEpisodes]:
    """Raise DataPlanError for the first setting the dataset cannot serve; return each split's episode count.
    class_sizes: {split: Counter(label -> images)} from the label index; needed for episodes="class"."""
    T = req.episode_length
    if req.episodes == "class" and class_sizes is None:
        raise DataPlanError(f"data.episodes: 'class' needs labels, and {req.root} has none (its card says "
                            f"has_labels={card.has_labels}); use data.episodes=random")
    counts = {}
    for split in ("train", "valid", "test"):
        sizes = class_sizes.get(split, Counter()) if req.episodes == "class" else None
        counts[split] = s = split_episodes(split, card.num_images[split], T, sizes)
        if s.episodes >= 1:
            continue
        if req.episodes == "class":
            raise DataPlanError(
                f"data.episodes: 'class' needs a class of at least episode_length={T} images in split '{split}' of "
                f"{req.root}; its largest of {s.num_classes} classes has {s.largest_class} images "
                f"({s.num_images} images in all). Use data.episodes=random, or prepare the data with a shorter "
                f"--episode-length and set model.episode_length to match")
        raise DataPlanError(f"model.episode_length: {T} is more than the {s.num_images} images of split '{split}' "
                            f"of {req.root}")
    for field, split, wanted in (("data.valid_episodes", "valid", req.valid_episodes),
                                 ("data.test_episodes", "test", req.test_episodes)):
        have = counts[split].episodes
        if wanted > have:
            raise DataPlanError(f"{field}: {wanted} requested, and split '{split}' of {req.root} holds {have} "
                                f"{req.episodes} episodes of {T} images ({counts[split].num_images} images): set "
                                f"{field}<={have}")
    per_rank = counts["train"].episodes // req.world_size
    if per_rank < req.batch_episodes:
        raise DataPlanError(
            f"data.batch_episodes: {req.batch_episodes} episodes per batch on each of {req.world_size} worker(s) "
            f"need {req.batch_episodes * req.world_size} training episodes per epoch; split 'train' of {req.root} "
            f"gives {counts['train'].episodes} {req.episodes} episodes of {T} images ({per_rank} per worker): "
            + (f"set data.batch_episodes<={per_rank}" if per_rank >= 1 else
               f"set scaling.num_workers<={counts['train'].episodes}" if counts["train"].episodes >= 1 else
               "the split is too small"))
    return counts


def class_sizes_of(labels_by_shard: dict[int, list[int]]) -> Counter:
    """Counter(label -> images) of one split's label index (pipeline.data.shards.manifest.read_labels)."""
    sizes: Counter = Counter()
    for labels in labels_by_shard.values():
        sizes.update(labels)
    return sizes
