"""A pyarrow filesystem that rides out an outage of the object store, for Ray Train's run storage.

Ray Train's controller writes its checkpoint-manager snapshot to the run's storage after every registered
checkpoint and deletes old checkpoints there; a failed write fails the run. pyarrow's S3FileSystem can retry
(`retry_strategy`), but the option is lost when Ray pickles the filesystem to the controller and the workers
(pyarrow 25: an unpickled copy gave up after 2 s instead of 25). This wrapper keeps its retries in Python, so
they survive pickling: every call goes through pipeline.retry, and an output stream is buffered and uploaded on
close as one retried write (a checkpoint file is a few MB; the snapshot a few KB).
"""
from __future__ import annotations

import io

import pyarrow
import pyarrow.fs

from pipeline.retry import RetryPolicy, with_retries

# About 30 s of backoff per call (0.5 + 1 + 2 + 4 + 8 + 8 + 8): a restart of the store, not a dead one.
STORAGE_RETRY = RetryPolicy(max_attempts=8, backoff_s=0.5, backoff_max_s=8.0)


def retrying(fs: pyarrow.fs.FileSystem, policy: RetryPolicy = STORAGE_RETRY) -> pyarrow.fs.FileSystem:
    """`fs` with every call retried; a local filesystem is returned as it is (nothing to wait out). The driver's
    RunConfig and the workers' checkpoints must use the same one: Ray refuses a checkpoint on another filesystem."""
    if isinstance(fs, pyarrow.fs.LocalFileSystem):
        return fs
    return pyarrow.fs.PyFileSystem(RetryingHandler(fs, policy))


class RetryingHandler(pyarrow.fs.FileSystemHandler):
    def __init__(self, fs: pyarrow.fs.FileSystem, policy: RetryPolicy = STORAGE_RETRY):
        self.fs, self.policy = fs, policy

    def __reduce__(self):  # the inner filesystem pickles itself; our policy travels with it
        return RetryingHandler, (self.fs, self.policy)

    def _call(self, what: str, action):
        return with_retries(f"{self.fs.type_name} {what}", action, self.policy)

    def __eq__(self, other):
        return isinstance(other, RetryingHandler) and self.fs.equals(other.fs)

    def __ne__(self, other):
        return not self == other

    def get_type_name(self):
        return f"retrying+{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self._call(f"stat {paths[:3]}", lambda: self.fs.get_file_info(paths))

    def get_file_info_selector(self, selector):
        return self._call(f"list {selector.base_dir}", lambda: self.fs.get_file_info(selector))

    def create_dir(self, path, recursive):
        self._call(f"mkdir {path}", lambda: self.fs.create_dir(path, recursive=recursive))

    def delete_dir(self, path):
        self._call(f"rmdir {path}", lambda: self.fs.delete_dir(path))

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self._call(f"empty {path}", lambda: self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok))

    def delete_root_dir_contents(self):
        self._call("empty /", lambda: self.fs.delete_dir_contents("/", accept_root_dir=True))

    def delete_file(self, path):
        self._call(f"rm {path}", lambda: self.fs.delete_file(path))

    def move(self, src, dest):
        self._call(f"mv {src}", lambda: self.fs.move(src, dest))

    def copy_file(self, src, dest):
        self._call(f"cp {src}", lambda: self.fs.copy_file(src, dest))

    def open_input_stream(self, path):
        return self._call(f"read {path}", lambda: pyarrow.BufferReader(self._read(path)))

    def open_input_file(self, path):
        return self._call(f"read {path}", lambda: pyarrow.BufferReader(self._read(path)))

    def _read(self, path) -> bytes:
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_UploadOnClose(self, path), mode="w")

    def open_append_stream(self, path, metadata):
        raise NotImplementedError("object stores do not append")


class _UploadOnClose(io.RawIOBase):
    """Collects what is written and uploads it in one retried write when closed."""

    def __init__(self, handler: RetryingHandler, path: str):
        super().__init__()
        self.handler, self.path, self.buffer = handler, path, io.BytesIO()

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.buffer.write(data)

    def close(self) -> None:
        if self.closed:
            return
        data = self.buffer.getvalue()

        def upload() -> None:
            with self.handler.fs.open_output_stream(self.path) as out:
                out.write(data)
        try:
            self.handler._call(f"write {self.path}", upload)
        finally:
            super().close()
