"""jobs/: one entrypoint per registered stage, the runtime env every job gets, and what `submit` checks locally."""

import pytest
from ray.runtime_env import RuntimeEnv

from ray_crm.cli import main
from ray_crm.jobs_client import CONFIG_ENV, ROOT, RUNTIME_ENV, build_runtime_env, job_script, jobs_address, run_job
from ray_crm.stages import STAGES


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_registered_stage_has_a_job_entrypoint(stage):
    path = ROOT / job_script(stage)
    assert path.is_file(), f"stage '{stage}' is registered but {path.relative_to(ROOT)} is missing"
    assert f'run_job("{stage}", sys.argv[1:])' in path.read_text()


def test_runtime_env_ships_the_checkout_offline_and_passes_rays_own_checks():
    env = build_runtime_env(RUNTIME_ENV, "name: shipped\n")
    assert env["working_dir"] == str(ROOT)
    assert {".venv/", ".git/", "outputs/"} <= set(env["excludes"])
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1" and env["env_vars"][CONFIG_ENV] == "name: shipped\n"
    RuntimeEnv(**env)  # Ray's validation of every field


def test_job_entry_uses_the_shipped_config_then_the_overrides(monkeypatch, capsys):
    monkeypatch.setenv(CONFIG_ENV, "name: shipped\nloss:\n  lambda_mmd: 2.0\n")
    assert run_job("demo", ["--print-config", "loss.lambda_mmd=0.5"]) == 0
    out = capsys.readouterr().out
    assert "name: shipped" in out and "lambda_mmd: 0.5" in out


def test_submit_rejects_a_bad_config_before_contacting_any_cluster(capsys):
    # Nothing listens on port 9: reaching the cluster would fail with 1, not 2.
    assert main(["submit", "demo", "loss.lamda_mmd=0.3", "--address", "http://127.0.0.1:9"]) == 2
    assert "did you mean 'loss.lambda_mmd'" in capsys.readouterr().err


def test_address_is_looked_up_as_ray_job_does(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert jobs_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://10.0.0.1:8265")
    assert jobs_address() == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:18265")
    assert jobs_address() == "http://127.0.0.1:18265" and jobs_address("http://h:1") == "http://h:1"
