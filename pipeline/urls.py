"""Credentials out of URLs before they are logged or stored.

A user may pass `https://user:token@host/data`, `s3://key:secret@bucket/x` or a presigned URL
(`...?X-Amz-Signature=...`) as a data source, shard root, storage path or tracking URI. Those strings end up in
MLflow params, `resolved.yaml`, run tags and log lines, all readable by everyone with access to the tracking
server, so every such place goes through `redact` (tests/test_urls.py and tests/test_tracking.py check it).
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
# query parameters that carry a secret (case-insensitive substrings): presigned S3/GCS/Azure URLs, API tokens
_SECRET_PARAM = re.compile(r"token|secret|signature|sig$|password|passwd|credential|key|auth|session", re.I)


def redact(text: str) -> str:
    """`text` with the password of its userinfo and the values of secret-looking query parameters masked; text
    that is not a URL with a scheme comes back unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:
        return MASK  # unparseable: do not risk echoing it
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user = userinfo.split(":", 1)[0]
        # a lone userinfo is often the token itself (https://<token>@github.com): mask it too
        netloc = f"{MASK}@{host}" if ":" not in userinfo else f"{user}:{MASK}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(_SECRET_PARAM.search(k) for k, _ in pairs):
            query = urlencode([(k, MASK if _SECRET_PARAM.search(k) else v) for k, v in pairs], safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return text  # nothing secret: keep it byte for byte (urlunsplit would rewrite sqlite:////abs paths)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_tree(value: Any) -> Any:
    """`redact` applied to every string in nested dicts, lists and tuples."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_tree(v) for v in value)
    return redact(value) if isinstance(value, str) else value


_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"()<>]+")


# userinfo whose URL was taken apart by a library before it wrote its error (botocore: 'Invalid bucket name
# "user:secret@bucket"', pyarrow: "bucket 'u:secret@b'"): user:password@host with no scheme left
_BARE_USERINFO = re.compile(r"(?<![\w/])([\w.%+-]+):(?!\*\*\*@)[^\s@/:'\"()<>]+@(?=[\w.-])")


def redact_text(text: str) -> str:
    """`redact` applied to every URL inside free text (error messages, log lines), and the password of userinfo
    left without its scheme."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    return _BARE_USERINFO.sub(lambda m: f"{m.group(1)}:{MASK}@", text) if "@" in text else text
