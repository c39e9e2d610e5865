"""No credential in what a job writes: log records, prints, tracebacks, library errors (pipeline.redaction)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.infra_helpers import REPO

SECRETS = ("SeCrEtPw", "ToKeN42")


def leaks(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(s in line for s in SECRETS)]


def test_every_way_a_process_writes_is_redacted():
    """A log record (with args and a traceback), print, a warning, an uncaught exception in a thread and in the
    main thread: each names the URL with its credentials masked, and nothing else is lost."""
    script = textwrap.dedent("""
        import logging, threading, warnings
        from pipeline.redaction import install
        install()
        logging.basicConfig(level=logging.INFO)
        url = "s3://me:SeCrEtPw@bucket/data?token=ToKeN42"
        logging.getLogger("lib").warning("retrying %s", url)
        try:
            raise OSError(f"could not open {url}")
        except OSError:
            logging.getLogger("lib").exception("gave up")
        print("reading", url)
        warnings.warn(f"slow store {url}")
        t = threading.Thread(target=lambda: (_ for _ in ()).throw(ValueError('bucket "me:SeCrEtPw@bucket"')))
        t.start(); t.join()
        raise RuntimeError(f"failed on {url}")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    out = r.stdout + r.stderr
    assert r.returncode == 1 and not leaks(out), leaks(out)
    for seen in ("WARNING:lib:retrying s3://me:***@bucket/data?token=***", "OSError: could not open s3://me:***@",
                 "reading s3://me:***@bucket", "slow store s3://me:***@", 'bucket "me:***@bucket"',
                 "RuntimeError: failed on s3://me:***@bucket/data?token=***"):
        assert seen in out, (seen, out)


@pytest.mark.parametrize("field", ["data.shards", "checkpoint.storage_path"])
def test_a_failing_job_never_prints_the_credentials_of_its_urls(field):
    """Checked to fail before pipeline.redaction: the retry layer's warnings printed the shard URL with its
    password and token 30 times, and pyarrow's error named the bucket as 'user:password@bucket'."""
    url = "s3://me:SeCrEtPw@no-such-bucket/x?token=ToKeN42"
    r = subprocess.run([sys.executable, "-m", "jobs.train", "--config", "jobs/configs/local.yaml",
                        f"{field}={url}", "tracking.enabled=false"], cwd=REPO, capture_output=True, text=True,
                       timeout=180, env={**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
                                         "AWS_ENDPOINT_URL": "http://127.0.0.1:9"})
    out = r.stdout + r.stderr
    assert r.returncode == 2, out[-3000:]
    assert f"{field}:" in r.stderr and "me:***@" in r.stderr, r.stderr[-3000:]
    assert not leaks(out), leaks(out)


def test_a_request_botocore_refuses_to_send_is_not_retried():
    """botocore's ParamValidationError (an invalid bucket name) is raised again on every try: not an outage."""
    import botocore.exceptions

    from pipeline.retry import RetryPolicy, with_retries
    calls = []

    def refused():
        calls.append(1)
        raise botocore.exceptions.ParamValidationError(report='Invalid bucket name "me:***@bucket"')
    with pytest.raises(botocore.exceptions.ParamValidationError):
        with_retries("read s3://me:***@bucket/x", refused, RetryPolicy(max_attempts=4, backoff_s=0.01))
    assert len(calls) == 1
