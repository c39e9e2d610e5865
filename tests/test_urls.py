"""Credentials never leave a URL for a log line, a param or a stored config."""
import pytest

from pipeline.urls import MASK, redact, redact_text, redact_tree


@pytest.mark.parametrize("url, expected", [
    ("https://user:tok3n@host.example/data?x=1", f"https://user:{MASK}@host.example/data?x=1"),
    ("https://ghp_abc123@github.com/o/r", f"https://{MASK}@github.com/o/r"),
    ("s3://bucket/key?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA%2F1&X-Amz-Expires=60",
     f"s3://bucket/key?X-Amz-Signature={MASK}&X-Amz-Credential={MASK}&X-Amz-Expires=60"),
    ("http://127.0.0.1:5000?access_token=s3cr3t", f"http://127.0.0.1:5000?access_token={MASK}"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("/plain/path", "/plain/path"),
])
def test_redact(url, expected):
    assert redact(url) == expected


def test_redact_in_text_and_trees():
    text = "data.shards: no usable prepared dataset at https://u:p4ss@h/x (403)"
    assert "p4ss" not in redact_text(text) and "https://u:***@h/x (403)" in redact_text(text)
    tree = {"data": {"source": "https://u:p4ss@h/x", "n": 3}, "l": ["s3://b/k?token=zz"]}
    assert "p4ss" not in str(redact_tree(tree)) and "zz" not in str(redact_tree(tree))
    assert redact_tree(tree)["data"]["n"] == 3
