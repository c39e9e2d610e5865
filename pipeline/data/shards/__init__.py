"""Episode shards on object storage: prepare once, stream exactly once per epoch, resume mid-epoch.

Modules, one idea each (filesystems of any URL: pipeline/storage.py, shared with the source readers):
    format.py            a shard = WebDataset tar of packed .npy blocks of images (bit-packed when binary)
    tar_index.py         zero-copy walk of a shard tar (no per-member copies, header checksums verified)
    manifest.py          manifest.parquet (shard path, url, count, bytes, sha256) and dataset.json (the card)
    source_checksums.py  sha256 of the source files, for the card
    prepare.py           load + validate every split, write shards atomically, skip valid ones, manifest last
    progress.py          the progress line of prepare
    fetch.py             one shard: ranged GET, retries, size/sha256 check against the manifest
    plan.py              the read order as pure functions of integers: who reads what, in which order
    reader.py            StreamConfig, Cursor, make_loader -> EpisodeLoader of EpisodeBatch (the training API)

Decisions and why:
  - Shards hold images, not pre-built episodes: training episodes must be re-drawn every epoch. Evaluation
    splits are stored in the order of pipeline.data.episodes.fixed_episodes, so their episodes are T consecutive
    images and are the same for every evaluation.
  - Images are packed in blocks of a few hundred per .npy member, so decoding is one np.frombuffer per block and
    nothing per image (stock per-image WebDataset decoding: ~5k images/s; this reader: 150k-600k per process).
  - Equal batches per rank (no DDP hang) and exactly-once together: the last episodes are padded and masked
    (remainder="pad"), or the tail is dropped and every batch is full (remainder="drop"); see plan.py.
  - The order does not depend on the number of DataLoader workers, so a run may resume with another worker
    count. The price: with N workers a rank fetches each of its shards up to N times (each worker takes every
    N-th batch). The reader is fast enough in one process that workers are rarely needed.
  - Integrity is checked on every fetch (size, sha256 by default); prepare re-run trusts a shard whose size and
    manifest sha256 match, or whose bytes hash to the expected sha256.
Limits: prepare holds a whole split in memory, and every reader process computes an O(split size) order array
per epoch; both are fine to tens of millions of 28x28 images, not beyond.
"""
