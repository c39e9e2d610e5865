"""Errors raised for bad dataset input. Each message names the file (or URL) and what was expected.

Two concrete classes so callers can keep catching the builtin they already expect: a missing file is a
FileNotFoundError, a file in the wrong format is a ValueError; both are DataSourceError.
"""


class DataSourceError(Exception):
    """Base of every error about a dataset source."""


class SourceNotFoundError(DataSourceError, FileNotFoundError):
    """A source file or directory does not exist."""


class SourceFormatError(DataSourceError, ValueError):
    """A source file exists but is not what the dataset needs (magic, size, count, shape, values)."""
