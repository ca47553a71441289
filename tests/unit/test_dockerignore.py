"""The image's build context holds no secrets, history, local data or virtualenv, and still holds the package.

Patterns are matched the way Docker does: from the context root, `*` and `?` within one folder, `**/` across
any folders, a matched folder takes all beneath it, and a later `!pattern` re-includes.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
EXCLUDED = [
    ".env", ".env.production", "cluster/.env", "deploy/prod.env", "server.pem", "cluster/tls/ca.pem",
    "cluster/tls/server.key", "id_rsa", "id_rsa.pub", "home/.ssh/id_rsa", "keys/id_ed25519", "credentials",
    ".aws/credentials", "deploy/gcp-credentials.json", ".netrc", ".git/config", ".git", "outputs/run/model.pt",
    "outputs", ".venv/bin/python", "data/pairs.jsonl", "data/pairs.jsonl.gz", "x/train.parquet", "raw.csv",
    "shards/00000.arrow", "pkg/__pycache__/mod.cpython-311.pyc",
]
KEPT = ["pyproject.toml", "README.md", "cluster/Dockerfile", "ray_crm/cli.py",
        "ray_crm/resources/demographic_keywords.json", "configs/prepare_vader.yaml"]


def _regex(pattern: str) -> re.Pattern:
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        else:
            out, i = out + {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i])), i + 1
    return re.compile(out + "(?:/.*)?")


def _rules() -> list[tuple[bool, re.Pattern]]:
    lines = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    return [(not line.startswith("!"), _regex(line.lstrip("!").strip("/").removeprefix("./")))
            for line in lines if line and not line.startswith("#")]


def excluded(path: str) -> bool:
    out = False
    for exclude, rule in _rules():
        if rule.fullmatch(path):
            out = exclude
    return out


@pytest.mark.parametrize("path", EXCLUDED)
def test_secrets_history_data_and_the_virtualenv_stay_out(path):
    assert excluded(path)


def test_the_package_and_its_configs_go_in():
    tracked = [p.relative_to(ROOT).as_posix() for top in ("ray_crm", "configs") for p in (ROOT / top).rglob("*")
               if p.is_file() and "__pycache__" not in p.parts]
    assert [p for p in KEPT + tracked if excluded(p)] == []


def test_no_per_dockerfile_ignore_file_shadows_the_root_one():
    """BuildKit reads <Dockerfile>.dockerignore instead of .dockerignore when it exists; the classic builder never."""
    assert [p for folder in (ROOT, ROOT / "cluster") for p in folder.glob("*Dockerfile*.dockerignore")] == []
