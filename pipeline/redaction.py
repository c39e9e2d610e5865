"""No secret reaches a terminal or a log file: redaction at the logging boundary of every process we start.

`pipeline.urls.redact` masks credentials in what we store and in the messages we write ourselves; but libraries
write too: the retry layer's warnings, botocore's and MLflow's error text, Ray's forwarded worker lines and every
traceback carry the URL they failed on verbatim, userinfo (`user:pass@`) and tokens (`?token=`) included.
`install()` redacts at the three places all of that passes through:
- every log record, as it is created (a record factory, so records of any logger, handler or formatter are covered,
  their tracebacks too);
- sys.stdout and sys.stderr (print, Ray's forwarded worker output, warnings);
- uncaught exceptions in the main thread and in threads (their tracebacks are written redacted).
The job entry points (`jobs/__init__.py`) and the Ray worker processes (`pipeline.cluster.ray_logging`) call it.
"""
from __future__ import annotations

import io
import logging
import sys
import threading
import traceback

from pipeline.urls import redact_text

_installed = False


class RedactingStream(io.TextIOBase):
    """A text stream that writes through to `inner` with every URL's credentials masked."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def write(self, text: str) -> int:
        self.inner.write(redact_text(text) if "://" in text else text)
        return len(text)

    def flush(self) -> None:
        self.inner.flush()

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self.inner.isatty()

    def fileno(self) -> int:
        return self.inner.fileno()

    @property
    def encoding(self):  # noqa: D102 - as the stream it wraps
        return getattr(self.inner, "encoding", "utf-8")

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _redact_record(record: logging.LogRecord) -> logging.LogRecord:
    try:
        message = record.getMessage()
    except Exception:  # noqa: BLE001 - a malformed record is logging's to report, unredacted args dropped
        message = str(record.msg)
    if "://" in message:
        record.msg, record.args = redact_text(message), None
    if record.exc_info and not record.exc_text:
        # formatted now and stored: formatters use exc_text when it is set and never see the raw exception
        text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        record.exc_text = redact_text(text)
    return record


def _excepthook(kind, value, tb) -> None:
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def _thread_excepthook(args) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread else "?"
    sys.stderr.write(f"Exception in thread {name}:\n" + redact_text(
        "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))))


def install() -> None:
    """Redact this process's log records, standard streams and uncaught exceptions (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    make_record = logging.getLogRecordFactory()
    logging.setLogRecordFactory(lambda *a, **kw: _redact_record(make_record(*a, **kw)))
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    # handlers made before now (logging.lastResort, basicConfig's) hold the raw streams: point them at ours
    for handler in [logging.lastResort, *logging.getLogger().handlers]:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout.inner, sys.stderr.inner):
            handler.stream = sys.stdout if handler.stream is sys.stdout.inner else sys.stderr
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
