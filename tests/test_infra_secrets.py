"""No credential in the deployment files: infra/ (every file), jobs/configs/, the Dockerfiles and their
.dockerignore, the Makefile and the README. The scanner looks for AWS access key ids, AWS-secret-like 40-character
strings given to a *SECRET* key, private key blocks, password/token/secret/access-key settings with a literal value
that is not a placeholder, and URLs with user:password@. Allowed, and nothing else: the moto placeholder `testing` of
the loopback dev stack (infra/local_stack.*), `<...>` placeholders (infra/kuberay/secret.example.yaml), `...`, and
references to variables ($VAR, ${VAR}; in Python any non-literal). The scanner is shown to catch planted fakes."""
from __future__ import annotations

import pathlib
import re

import pytest

from tests.infra_helpers import REPO

ALLOWED_LITERALS = {"testing"}  # moto's documented test credentials, used only against the loopback dev stack

AWS_KEY_ID = re.compile(r"(?<![A-Z0-9])(AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")
AWS_SECRET = re.compile(r"(?i)[\w.-]*secret[\w.-]*[\"']?\s*[:=]\s*[\"']?([A-Za-z0-9/+=]{40})(?![A-Za-z0-9/+=])")
PRIVATE_KEY = re.compile(r"-----BEGIN ([A-Z0-9]+ )*PRIVATE KEY( BLOCK)?-----")
GITHUB_TOKEN = re.compile(r"\b(ghp|gho|ghu|ghs|ghr|github_pat)_[A-Za-z0-9_]{20,}")
SETTING = re.compile(
    r"(?i)(?<![\w-])(?P<key>[\w.-]*(?:password|passwd|token|secret|api_?key|access_key(?:_id)?))[\"']?"
    r"\s*(?::|=|\s=\s)\s*(?P<val>\"[^\"\n]*\"|'[^'\n]*'|[^\s,;#}\])]+)")
URL_CREDENTIALS = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://(?P<user>[^\s/:@'\"<>]+):(?P<pw>[^\s/@'\"<>]+)@")


def scanned_files() -> list[pathlib.Path]:
    files = [p for p in (REPO / "infra").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    files += [p for p in (REPO / "jobs" / "configs").rglob("*") if p.is_file()]
    files += [REPO / "Makefile", REPO / "README.md", REPO / ".dockerignore"]
    return sorted(set(files))


def _placeholder(value: str, python: bool) -> bool:
    quoted = value[:1] in "\"'" and value[-1:] == value[:1] and len(value) >= 2
    if python and not quoted:
        return True  # a name or an expression: a variable, not a literal
    v = value[1:-1] if quoted else value
    return (v in ALLOWED_LITERALS or not v or v.startswith(("$", "...")) or re.fullmatch(r"<[^<>]+>", v) is not None)


def scan_text(text: str, name: str = "") -> list[tuple[int, str, str]]:
    """[(line number, what, the offending line)] of credential-like strings in the text."""
    python = name.endswith(".py")
    found = []
    for n, line in enumerate(text.splitlines(), 1):
        hits = []
        if AWS_KEY_ID.search(line):
            hits.append("AWS access key id")
        if PRIVATE_KEY.search(line):
            hits.append("private key block")
        if GITHUB_TOKEN.search(line):
            hits.append("GitHub token")
        m = AWS_SECRET.search(line)
        if m and m.group(1) not in ALLOWED_LITERALS:
            hits.append("AWS secret access key")
        for m in SETTING.finditer(line):
            if not _placeholder(m.group("val"), python):
                hits.append(f"{m.group('key')} set to a literal")
        for m in URL_CREDENTIALS.finditer(line):
            if not (m.group("pw").startswith("$") or m.group("pw") in ALLOWED_LITERALS):
                hits.append("URL with user:password@")
        found += [(n, h, line.strip()) for h in hits]
    return found


def scan(paths: list[pathlib.Path]) -> list[str]:
    out = []
    for p in paths:
        try:
            text = p.read_text()
        except UnicodeDecodeError:
            text = p.read_bytes().decode("latin-1")
        out += [f"{p.relative_to(REPO) if p.is_relative_to(REPO) else p}:{n}: {what}: {line[:120]}"
                for n, what, line in scan_text(text, p.name)]
    return out


def test_the_deployment_files_hold_no_credentials():
    files = scanned_files()
    names = {str(p.relative_to(REPO)) for p in files}
    assert {"infra/docker/Dockerfile", "infra/docker/Dockerfile.cpu", "infra/kuberay/secret.example.yaml",
            "infra/launcher/aws.yaml", "infra/runtime_env.yaml", "jobs/configs/mnist_gpu.yaml", "Makefile",
            "README.md"} <= names
    assert scan(files) == []


# Fakes are built at run time so that no credential-shaped string sits in the repository itself.
FAKE_KEY_ID = "AKIA" + "IOSFODNN7" + "EXAMPLE"                        # AWS's documented example key id
FAKE_SECRET = "wJalrXUtnFEMI/K7MDENG/" + "bPxRfiCYEXAMPLEKEY"         # AWS's documented example secret (40)
PLANTED = [
    (f"AWS_ACCESS_KEY_ID={FAKE_KEY_ID}\n", "AWS access key id"),
    (f"aws_access_key_id: {'ASIA' + 'Q' * 16}\n", "AWS access key id"),
    (f"AWS_SECRET_ACCESS_KEY: {FAKE_SECRET}\n", "AWS secret access key"),
    (f'export MY_SECRET="{FAKE_SECRET}"\n', "AWS secret access key"),
    ("-----BEGIN " + "RSA PRIVATE KEY-----\nMIIEow...\n", "private key block"),
    ("-----BEGIN " + "OPENSSH PRIVATE KEY-----\n", "private key block"),
    ("db:\n  password: hunter2\n", "password set to a literal"),
    ('{"token": "abc123def"}\n', "token set to a literal"),
    ("MLFLOW_TRACKING_PASSWORD=s3cr3t\n", "MLFLOW_TRACKING_PASSWORD set to a literal"),
    ("api_key = 'k-123'\n", "api_key set to a literal"),
    ("  - --env MLFLOW_TRACKING_URI=https://admin:" + "hunter2@mlflow.example.com\n", "URL with user:password@"),
    ("url: s3://minio:" + "minio123@minio:9000/bucket\n", "URL with user:password@"),
    ("TOKEN = " + "ghp_" + "a" * 36 + "\n", "GitHub token"),
]


@pytest.mark.parametrize("text,what", PLANTED, ids=[w for _, w in PLANTED])
def test_scanner_catches_a_planted_credential(tmp_path, text, what):
    planted = tmp_path / "planted.yaml"
    planted.write_text("# an innocent file\nkind: ConfigMap\n" + text)
    found = scan([planted])
    assert any(what in f for f in found), found


def test_scanner_catches_a_fake_key_planted_in_a_copy_of_a_real_file(tmp_path):
    real = (REPO / "infra" / "kuberay" / "configmap.yaml").read_text()
    copy = tmp_path / "configmap.yaml"
    copy.write_text(real + f"  AWS_ACCESS_KEY_ID: {FAKE_KEY_ID}\n  AWS_SECRET_ACCESS_KEY: {FAKE_SECRET}\n")
    found = scan([copy])
    assert any("AWS access key id" in f for f in found) and any("AWS secret access key" in f for f in found)
    planted_lines = {len(real.splitlines()) + 1, len(real.splitlines()) + 2}
    assert {int(f.split(":")[1]) for f in found} == planted_lines, found  # nothing else in the real file


@pytest.mark.parametrize("text", [
    "export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing\n",   # the loopback dev stack (moto)
    'S3_KEY, S3_SECRET = "testing", "testing"\n',
    '  AWS_ACCESS_KEY_ID: "<your-access-key-id>"\n  AWS_SECRET_ACCESS_KEY: "<your-secret-access-key>"\n',
    "AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY}\nMLFLOW_TRACKING_TOKEN=$TOKEN\n",
    "printf 'AWS_ACCESS_KEY_ID=...\\n'\n",
    "- secretRef: {name: kpp-secrets}\nkind: Secret\n",
    "# token auth keeps one token in ~/.ray/auth_token\n",
    "url: https://<user>:<password>@host/\n",
])
def test_scanner_allows_placeholders(text):
    assert scan_text(text, "x.yaml") == []


def test_only_the_exact_moto_placeholder_is_allowed():
    assert scan_text("AWS_SECRET_ACCESS_KEY=testing\n", "x.env") == []
    assert scan_text("AWS_SECRET_ACCESS_KEY=testing2\n", "x.env") != []
    assert scan_text("AWS_SECRET_ACCESS_KEY=Testing\n", "x.env") != []


def test_python_code_counts_only_literals():
    assert scan_text("client(aws_secret_access_key=S3_SECRET, token=self.token)\n", "x.py") == []
    assert scan_text('client(aws_secret_access_key="hunter22")\n', "x.py") != []
