"""Episode shards on object storage: the on-disk format, the Parquet manifest and dataset card, the writer that
prepares them (jobs/prepare.py) and the streaming reader that training consumes (pipeline.shards.reader)."""
