"""`ray-crm submit | status | logs | stop` against a real Ray head on 127.0.0.1, through the installed command.

The jobs run in this venv's Python (`--python`), as they would on a head started from it; on a cluster image
the default `python` is the image's.
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.ray_head import local_head
from tests.tiny_models import WORDS

pytestmark = pytest.mark.integration
RAY_CRM = str(Path(sys.executable).with_name("ray-crm"))


@pytest.fixture(scope="module")
def head():
    with local_head(num_cpus=2) as h:
        yield h


def ray_crm(head, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the installed `ray-crm` as a user would, against the test head."""
    return subprocess.run([RAY_CRM, *args, "--address", head.address], env=head.env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def submit(head, stage: str, *args: str, **kw) -> subprocess.CompletedProcess:
    return ray_crm(head, "submit", stage, "--python", sys.executable, *args, **kw)


def test_submit_streams_the_job_and_succeeds_with_a_config_from_outside_the_checkout(head, tmp_path):
    config = tmp_path / "mine.yaml"  # outside the working dir: its text travels with the job
    config.write_text("name: from_my_file\nloss:\n  type: crm\n  lambda_mmd: 1.0\n")
    r = submit(head, "demo", "--config", str(config), "loss.lambda_mmd=0.3", "--print-config")
    assert r.returncode == 0, r.stderr
    assert "name: from_my_file" in r.stdout and "lambda_mmd: 0.3" in r.stdout and "type: crm" in r.stdout
    assert "SUCCEEDED" in r.stderr


def test_no_wait_then_status_and_logs(head):
    r = submit(head, "demo", "--print-config", "name=later", "--no-wait", "--submission-id", "rcj-later")
    assert r.returncode == 0 and r.stdout.strip() == "rcj-later", r.stderr
    deadline = time.monotonic() + 300
    while "SUCCEEDED" not in (s := ray_crm(head, "status", "rcj-later")).stdout:
        assert s.returncode == 0 and time.monotonic() < deadline, s.stdout + s.stderr
        assert "FAILED" not in s.stdout, ray_crm(head, "logs", "rcj-later").stdout
        time.sleep(1)
    assert "name: later" in ray_crm(head, "logs", "rcj-later").stdout
    assert ray_crm(head, "logs", "rcj-later", "--tail", "3").stdout.count("\n") == 3


def test_a_failing_job_exits_non_zero_with_its_status_and_log_tail(head):
    r = submit(head, "demo", "--print-config", "--python", "/nonexistent/python3")
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "/nonexistent/python3" in r.stderr.split("--- last")[-1]


def test_stop_ends_a_running_job_started_with_ray_job(head):
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "job", "submit", "--address", head.address, "--submission-id", "rcj-sleep", "--no-wait",
                    "--", "sleep", "600"], env=head.env, check=True, capture_output=True, timeout=120)
    r = ray_crm(head, "stop", "rcj-sleep", timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "rcj-sleep: STOPPED", r.stdout + r.stderr
    assert "STOPPED" in ray_crm(head, "status", "rcj-sleep").stdout


@pytest.mark.parametrize("token", [None, "0" * 64], ids=["no-token", "wrong-token"])
def test_submit_without_the_heads_token_is_refused_and_starts_nothing(head, token):
    env = {k: v for k, v in head.env.items() if k != "RAY_AUTH_TOKEN"} | ({"RAY_AUTH_TOKEN": token} if token else {})
    r = subprocess.run([RAY_CRM, "submit", "demo", "--python", sys.executable, "--print-config", "--no-wait",
                        "--submission-id", f"rcj-noauth-{bool(token)}", "--address", head.address],
                       env=env, capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode != 0 and "RAY_AUTH_TOKEN" in r.stderr, r.stdout + r.stderr
    status = ray_crm(head, "status", f"rcj-noauth-{bool(token)}")  # with the token: no such job was created
    assert status.returncode == 1 and "does not exist" in status.stderr


def test_an_unknown_job_is_one_line_and_exit_1(head):
    r = ray_crm(head, "status", "no-such-job")
    assert r.returncode == 1 and "no-such-job" in r.stderr and "Traceback" not in r.stderr


def write_pairs(path: Path, n: int = 160) -> None:
    rng = random.Random(0)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."

    splits = ["train"] * 6 + ["validation", "test"]
    path.write_text("".join(json.dumps({"prompt": sentence(2, 5), "chosen": sentence(3, 14),
                                        "rejected": sentence(3, 14), "split": rng.choice(splits)}) + "\n"
                            for _ in range(n)))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_bert_dir):
    """A config for a few steps of a causal RM on tiny data, as a user would write it (outside the checkout)."""
    root = tmp_path_factory.mktemp("jobs_e2e")
    write_pairs(root / "pairs.jsonl")
    config = {
        "name": "e2e", "output_dir": str(root / "out"),
        "model": {"name": str(tiny_bert_dir), "max_length": 64, "lora": {"rank": 4, "alpha": 8}},
        "loss": {"type": "crm", "lambda_mmd": 0.1},
        "data": {"paths": [str(root / "pairs.jsonl")], "columns": {"split": "split"}, "block_rows": 64,
                 "spurious": [{"name": "length", "kind": "length", "unit": "tokens", "bins": 3}],
                 "binning": {"min_count": 2}},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "batch_size": 8, "max_steps": 3},
    }
    (root / "e2e.yaml").write_text(yaml.safe_dump(config))
    return root


def test_prepare_then_train_rm_as_jobs(head, tiny_run):
    config = str(tiny_run / "e2e.yaml")
    r = submit(head, "prepare", "--config", config)
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((tiny_run / "out/e2e/prepare/manifest.json").read_text())
    assert manifest["splits"]["train"]["pairs"] > 0 and manifest["num_bins"] >= 2
    r = submit(head, "train-rm", "--config", config)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = list((tiny_run / "out/e2e/train-rm").glob("*/export/**/config.json"))
    assert exported, r.stdout[-3000:]


def test_a_job_given_a_bad_input_fails_and_shows_the_error(head, tiny_run):
    r = submit(head, "prepare", "--config", str(tiny_run / "e2e.yaml"), f"data.paths=[{tiny_run}/missing.jsonl]")
    assert r.returncode == 1
    assert "FAILED" in r.stderr and "missing.jsonl" in r.stderr.split("--- last")[-1]
