"""jobs/: one entrypoint per registered stage, the runtime env every job gets, and what `submit` checks locally."""

import zipfile
from pathlib import Path

import pytest
import yaml
from ray._private.runtime_env.packaging import create_package
from ray.runtime_env import RuntimeEnv

from ray_crm import jobs_client
from ray_crm.cli import main, run_job
from ray_crm.jobs_client import (
    CONFIG_FILE,
    CONFIG_PACKAGE,
    ROOT,
    RUNTIME_ENV,
    build_runtime_env,
    job_script,
    jobs_address,
    shipped_config,
)
from ray_crm.stages import STAGES

CONFIG_TEXT = "name: shipped\nloss:\n  type: crm\n  lambda_mmd: 2.0\n"


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_registered_stage_has_a_job_entrypoint(stage):
    path = ROOT / job_script(stage)
    assert path.is_file(), f"stage '{stage}' is registered but {path.relative_to(ROOT)} is missing"
    assert f'run_job("{stage}", sys.argv[1:])' in path.read_text()


def test_runtime_env_ships_the_checkout_offline_with_the_config_as_a_file_and_passes_rays_own_checks():
    with shipped_config(CONFIG_TEXT) as folder:
        env = build_runtime_env(RUNTIME_ENV, folder)
        assert (folder / CONFIG_FILE).read_text() == CONFIG_TEXT and folder.name == CONFIG_PACKAGE
        RuntimeEnv(**env)  # Ray's validation of every field
    assert env["working_dir"] == str(ROOT) and env["py_modules"] == [str(folder)]
    assert env["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert not any("shipped" in v for v in env["env_vars"].values())  # the dashboard shows env vars
    required = {".env", "*.pem", "*.key", "id_rsa*", ".git", "outputs/", ".venv/", "*.parquet", "*.jsonl", "*.csv",
                "*.gz"}
    assert required <= set(env["excludes"])
    assert build_runtime_env(RUNTIME_ENV, None).get("py_modules") is None
    assert not folder.exists()  # gone once the upload is over


def _packaged(folder: Path, zip_path: Path, excludes: list[str], parent: bool = False) -> set[str]:
    """The files Ray's own packager uploads from a folder under these excludes."""
    create_package(str(folder), zip_path, include_gitignore=False, include_parent_dir=parent, excludes=excludes)
    return {n for n in zipfile.ZipFile(zip_path).namelist() if not n.endswith("/")}


def test_the_upload_leaves_out_secrets_data_and_history(tmp_path):
    kept = {"ray_crm/config.py", "ray_crm/resources/concept_keywords.json", "jobs/train_rm.py",
            "jobs/runtime_env.yaml", "configs/demo.yaml", "cluster/aws-network.sh", "README.md"}
    left_out = {".env", ".env.local", "deploy/server.pem", "secrets/api.key", ".ssh/id_rsa", "id_ed25519.pub",
                ".aws/credentials", ".git/config", "outputs/run/metrics.csv", ".venv/bin/python",
                "data/train.jsonl", "data/pairs.parquet", "data/z.csv", "data/raw.json.gz", "model/w.safetensors"}
    checkout = tmp_path / "checkout"
    for name in kept | left_out:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("x")
    excludes = build_runtime_env(RUNTIME_ENV, None)["excludes"]
    assert _packaged(checkout, tmp_path / "wd.zip", excludes) == kept
    (tmp_path / "worktree").mkdir()
    (tmp_path / "worktree" / ".git").write_text("gitdir: elsewhere")  # a worktree's .git is a file
    assert _packaged(tmp_path / "worktree", tmp_path / "wt.zip", excludes) == set()


def test_job_entry_uses_the_shipped_config_then_the_overrides(monkeypatch, capsys, tmp_path):
    node = tmp_path / "node"  # the config folder as a node unpacks its py_modules package, put on the path
    with shipped_config(CONFIG_TEXT) as folder:
        excludes = build_runtime_env(RUNTIME_ENV, folder)["excludes"]
        assert _packaged(folder, tmp_path / "cfg.zip", excludes, parent=True) == {f"{CONFIG_PACKAGE}/{CONFIG_FILE}"}
    zipfile.ZipFile(tmp_path / "cfg.zip").extractall(node)
    monkeypatch.syspath_prepend(str(node))
    assert run_job("demo", ["--print-config", "loss.lambda_mmd=0.5"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["name"] == "shipped" and printed["loss"]["lambda_mmd"] == 0.5


def test_job_entry_without_a_shipped_config_runs_the_defaults(capsys):
    assert run_job("demo", ["--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "run"


def test_submit_hands_ray_the_config_file_for_the_upload_and_keeps_it_out_of_what_the_dashboard_shows(
        monkeypatch, tmp_path):
    seen = {}

    class Client:  # what submit_job receives; the real one uploads the py_modules folder before it returns
        def submit_job(self, entrypoint, runtime_env, submission_id, metadata):
            [folder] = runtime_env["py_modules"]
            seen.update(entrypoint=entrypoint, env=runtime_env, folder=Path(folder), metadata=metadata,
                        text=Path(folder, CONFIG_FILE).read_text())
            return "job-1"

    monkeypatch.setattr(jobs_client, "_client", lambda address: Client())
    config = tmp_path / "mine.yaml"
    config.write_text(CONFIG_TEXT)
    assert jobs_client.submit("demo", str(config), ["output_dir=/shared"], wait=False) == 0
    assert seen["text"] == CONFIG_TEXT and seen["folder"].name == CONFIG_PACKAGE and not seen["folder"].exists()
    shown = [seen["entrypoint"], *seen["env"]["env_vars"].values(), *map(str, seen["metadata"].values())]
    assert not any("shipped" in text for text in shown)


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
