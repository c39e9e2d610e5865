"""Retries with exponential backoff for calls to remote stores (object storage, the tracking server).

One policy object and one loop for every store the pipeline talks to: shards and manifests (pipeline/data/shards),
checkpoints (pipeline/train/checkpointing.py) and MLflow metrics (pipeline/registry/tracking.py). A transient outage of the
S3 endpoint or the tracking server is waited out; a permanent error (missing object, permission) is raised at once.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


# Retrying cannot fix these: a missing or forbidden object, bytes that do not parse (ValueError: a corrupt card,
# manifest or shard, bad JSON, Arrow's ArrowInvalid), or a programming error. Raised at once, not after a quarter
# minute of backoff.
PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ValueError, LookupError,
             TypeError, AttributeError, NotImplementedError)
# Credentials that are missing or refused: botocore's own exception types (by name: botocore need not be
# installed) and the error codes S3 and pyarrow's S3 client put in the message. Waiting does not mend them.
CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "NoRegionError", "ProfileNotFound",
                     "InvalidConfigError", "CredentialRetrievalError"}
CREDENTIAL_CODES = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken",
                    "InvalidToken", "ACCESS_DENIED", "No credentials", "Unable to locate credentials")


# A request the client refuses to send (a bucket name botocore rejects, e.g. a URL with user:password@ in it)
INVALID_REQUEST_ERRORS = {"ParamValidationError"}


def credential_error(err: BaseException) -> bool:
    """Credentials missing or refused (see CREDENTIAL_ERRORS, CREDENTIAL_CODES)."""
    return any(k.__name__ in CREDENTIAL_ERRORS for k in type(err).__mro__) or \
        any(code in str(err) for code in CREDENTIAL_CODES)


def permanent(err: BaseException) -> bool:
    """Whether a retry cannot mend `err` (see PERMANENT, CREDENTIAL_ERRORS)."""
    if isinstance(err, PERMANENT) and not isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if any(k.__name__ in CREDENTIAL_ERRORS | INVALID_REQUEST_ERRORS for k in type(err).__mro__):
        return True
    text = str(err)
    return any(code in text for code in CREDENTIAL_CODES)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 6       # per store operation, counting the first
    backoff_s: float = 0.5      # doubled after each failure ...
    backoff_max_s: float = 8.0  # ... up to this (defaults: 0.5+1+2+4+8 = 15.5 s of outage survived)


def with_retries(what: str, action: Callable[[], T], policy: RetryPolicy = RetryPolicy()) -> T:
    """action() retried on transient errors with exponential backoff; permanent ones are raised at once.

    Transient is everything `permanent` does not name: the object stores' connection, timeout and 5xx errors
    come from several client libraries (aiohttp, botocore, OSError) and none of them is worth failing an epoch
    for at the first try.
    """
    max_attempts = policy.max_attempts
    for attempt in range(1, max_attempts + 1):
        try:
            return action()
        except Exception as err:  # noqa: BLE001 - see docstring: transient errors come in many types
            if permanent(err):
                if credential_error(err) and not isinstance(err, OSError):  # botocore's: an OSError, as callers expect of a store
                    raise PermissionError(f"{what}: credentials missing or refused: {type(err).__name__}: {err}") from err
                raise
            if attempt == max_attempts:
                raise OSError(f"{what}: failed after {max_attempts} attempts: {type(err).__name__}: {err}") from err
            delay = min(policy.backoff_max_s, policy.backoff_s * 2 ** (attempt - 1))
            log.warning("%s: attempt %d/%d failed (%s: %s); retrying in %.1fs",
                        what, attempt, max_attempts, type(err).__name__, err, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")
