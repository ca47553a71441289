"""Stages as Ray jobs: `ray-crm submit | status | logs | stop` over the Ray Jobs API, as `ray job` does.

A job runs `jobs/<stage>.py` inside a copy of this checkout (the runtime env's working_dir), so the cluster runs
the code you submit, with the dependencies of its image. The config is checked here before anything is sent,
then travels as a file in an uploaded folder of its own (a `py_modules` entry, put on the job's PYTHONPATH), so
the file may live anywhere on this machine and its text stays out of the dashboard, which shows env vars and the
entrypoint. The runtime env's `excludes` keep secrets (.env, keys) and data files out of the upload.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from ray_crm.config import ConfigError, load_config
from ray_crm.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]  # the checkout holding jobs/, configs/, cluster/
RUNTIME_ENV = ROOT / "jobs" / "runtime_env.yaml"
CONFIG_PACKAGE = "ray_crm_job_config"  # the folder `submit` ships the config in; the job finds it on its path
CONFIG_FILE = "config.yaml"
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TAIL_LINES = 40
COMMANDS = ("submit", "status", "logs", "stop")


def jobs_address(explicit: str | None = None) -> str:
    """Flag, then $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS (the order `ray job` uses), then the local head."""
    return explicit or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(jobs_address(address))


def job_script(stage: str) -> str:
    """The entrypoint file of a stage, relative to the checkout: train-rm -> jobs/train_rm.py."""
    return f"jobs/{stage.replace('-', '_')}.py"


@contextlib.contextmanager
def shipped_config(text: str | None) -> Iterator[Path | None]:
    """A temporary <CONFIG_PACKAGE>/<CONFIG_FILE> folder holding the config text, for as long as the upload takes
    (`submit_job` uploads before it returns); None without a config."""
    if text is None:
        yield None
        return
    with tempfile.TemporaryDirectory(prefix="ray_crm_submit_") as tmp:
        folder = Path(tmp, CONFIG_PACKAGE)
        folder.mkdir()
        (folder / CONFIG_FILE).write_text(text)
        yield folder


def build_runtime_env(path: Path, config_dir: Path | None) -> dict[str, Any]:
    """The YAML runtime env with its working_dir made absolute and the config folder added to its py_modules."""
    env = yaml.safe_load(Path(path).read_text()) or {}
    env["working_dir"] = str((ROOT / env.get("working_dir", ".")).resolve())
    if config_dir is not None:
        env["py_modules"] = [*env.get("py_modules", []), str(config_dir)]
    return env


def submit(stage: str, config: str | None, overrides: list[str], *, print_config: bool = False, verbose: bool = False,
           address: str | None = None, wait: bool = True, python: str = "python", submission_id: str | None = None,
           runtime_env: str | Path = RUNTIME_ENV) -> int:
    """Check the config, submit the stage, then (unless wait=False) stream its logs until it ends."""
    cfg = load_config(config, overrides)  # a bad key fails here, before any upload
    if not Path(cfg.output_dir).is_absolute():
        print(f"ray-crm submit: warning: output_dir '{cfg.output_dir}' is relative, so the job writes inside its "
              "temporary copy of the working dir; give output_dir=/a/path/every/node/sees", file=sys.stderr)
    args = [python, job_script(stage), *overrides, *(["--print-config"] if print_config else []),
            *(["--verbose"] if verbose else [])]
    client = _client(address)
    with shipped_config(Path(config).read_text() if config else None) as config_dir:
        job_id = client.submit_job(
            entrypoint=shlex.join(args),
            runtime_env=build_runtime_env(Path(runtime_env), config_dir),
            submission_id=submission_id,
            metadata={"ray_crm_stage": stage, "ray_crm_config": str(config or "")},
        )
    print(f"ray-crm submit: job '{job_id}' submitted to {jobs_address(address)}", file=sys.stderr)
    if not wait:
        print(job_id)
        return 0
    return follow(client, job_id)


async def _stream(client, job_id: str) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(lines, end="", flush=True)


def _wait_terminal(client, job_id: str, poll_s: float = 0.5):
    while not (info := client.get_job_info(job_id)).status.is_terminal():
        time.sleep(poll_s)
    return info


def follow(client, job_id: str) -> int:
    """Stream a job's logs until it ends: 0 if it SUCCEEDED, else 1 with the status and its log tail on stderr."""
    try:
        asyncio.run(_stream(client, job_id))
        info = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        print(f"\nray-crm: no longer following job '{job_id}'; it goes on (`ray-crm stop {job_id}` ends it)",
              file=sys.stderr)
        return 130
    if info.status == "SUCCEEDED":
        print(f"ray-crm: job '{job_id}' SUCCEEDED", file=sys.stderr)
        return 0
    tail = client.get_job_logs(job_id).splitlines()[-TAIL_LINES:]
    print(f"ray-crm: job '{job_id}' {info.status}: {info.message or ''}", f"--- last {len(tail)} log lines ---",
          *tail, sep="\n", file=sys.stderr)
    return 1


def status(job_id: str, address: str | None = None) -> int:
    info = _client(address).get_job_info(job_id)
    print(f"{job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0


def logs(job_id: str, address: str | None = None, follow_logs: bool = False, tail: int | None = None) -> int:
    client = _client(address)
    if follow_logs:
        asyncio.run(_stream(client, job_id))
        return 0
    lines = client.get_job_logs(job_id).splitlines(keepends=True)
    print("".join(lines[-tail:] if tail else lines), end="")
    return 0


def stop(job_id: str, address: str | None = None, wait: bool = True) -> int:
    """Ask the job to stop (SIGTERM, then SIGKILL) and, by default, wait until it has."""
    client = _client(address)
    if not client.stop_job(job_id):
        print(f"ray-crm stop: job '{job_id}' had already ended", file=sys.stderr)
    info = _wait_terminal(client, job_id) if wait else client.get_job_info(job_id)
    print(f"{job_id}: {info.status}")
    return 0


def add_parsers(sub, add_stage_arguments: Callable[[argparse.ArgumentParser, str], None]) -> None:
    """The subcommands; `submit STAGE` takes the stage's own arguments plus the job's."""
    address_help = f"Jobs API address (default: $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS})"
    submit_p = sub.add_parser("submit", help="run a stage as a Ray job on a cluster and follow it")
    stages = submit_p.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for stage in STAGES.values():
        p = stages.add_parser(stage.name, help=stage.help, description=f"Submit `ray-crm {stage.name}` as a Ray job.")
        add_stage_arguments(p, stage.name)
        p.add_argument("--address", help=address_help)
        p.add_argument("--no-wait", action="store_true", help="print the job id and return at once")
        p.add_argument("--python", default="python",
                       help="the job's interpreter on the cluster (default: python; for a head started from a "
                            "venv, that venv's python)")
        p.add_argument("--submission-id", help="the job's id (default: generated)")
        p.add_argument("--runtime-env", default=str(RUNTIME_ENV), help="runtime env YAML (default: %(default)s)")
    helps = {"status": "a job's status", "logs": "a job's logs", "stop": "stop a job and wait until it has stopped"}
    for name, text in helps.items():
        p = sub.add_parser(name, help=text)
        p.add_argument("job_id", help="the submission id printed by `ray-crm submit`")
        p.add_argument("--address", help=address_help)
        if name == "logs":
            p.add_argument("-f", "--follow", action="store_true", help="stream until the job ends")
            p.add_argument("--tail", type=int, help="only the last N lines")
        if name == "stop":
            p.add_argument("--no-wait", action="store_true", help="return once the stop is requested")


def run_command(args: argparse.Namespace, alias_overrides: list[str]) -> int:
    """Dispatch a parsed job command (the stage's option aliases come as overrides); connection and Jobs API errors
    become one line and exit code 1."""
    from ray.exceptions import AuthenticationError

    try:
        if args.command == "submit":
            return submit(args.stage, args.config, args.overrides + alias_overrides, print_config=args.print_config,
                          verbose=getattr(args, "verbose", False),
                          address=args.address, wait=not args.no_wait, python=args.python,
                          submission_id=args.submission_id, runtime_env=args.runtime_env)
        if args.command == "status":
            return status(args.job_id, args.address)
        if args.command == "logs":
            return logs(args.job_id, args.address, args.follow, args.tail)
        return stop(args.job_id, args.address, wait=not args.no_wait)
    except ConfigError as exc:
        print(f"ray-crm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    except AuthenticationError as exc:
        print(f"ray-crm {args.command}: {exc}\nThe cluster uses token auth: export RAY_AUTH_MODE=token and its token "
              "as RAY_AUTH_TOKEN (or in ~/.ray/auth_token); `ray get-auth-token` on the head prints it.", file=sys.stderr)
        return 1
    except (ConnectionError, RuntimeError, FileNotFoundError) as exc:
        print(f"ray-crm {args.command}: {exc}", file=sys.stderr)
        return 1


def shipped_config_path() -> Path | None:
    """The config file `submit` shipped with this job: <CONFIG_PACKAGE>/<CONFIG_FILE> on the Python path."""
    spec = importlib.util.find_spec(CONFIG_PACKAGE)
    folders = spec.submodule_search_locations if spec is not None else None
    return next((Path(f, CONFIG_FILE) for f in folders or [] if Path(f, CONFIG_FILE).is_file()), None)
