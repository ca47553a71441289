"""A real Ray head for tests that talk to it over the Jobs API, as a user's laptop head would be.

Everything it opens is on 127.0.0.1 at free ports of its own, with its own temp dir and its own auth token, so it
neither collides with nor is found by other Ray clusters on the machine, and the machine's ~/.ray/auth_token plays
no part. It is stopped by ending its own process tree (never `ray stop`, which would end every cluster of the user).
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass(frozen=True)
class Head:
    address: str  # the Jobs API (dashboard) URL
    env: dict[str, str]  # the environment a client needs: this process's, plus the head's auth token


@contextmanager
def local_head(num_cpus: int = 2, object_store_bytes: int = 400 * 2**20, timeout_s: float = 120.0):
    """Start `ray start --head --block` with token auth; yield a Head; end the whole process tree."""
    # A short path under /tmp: Ray's socket paths have a length limit.
    with tempfile.TemporaryDirectory(prefix="rcj", dir="/tmp", ignore_cleanup_errors=True) as temp:
        yield from _run_head(Path(temp), num_cpus, object_store_bytes, timeout_s)


def _run_head(temp: Path, num_cpus: int, object_store_bytes: int, timeout_s: float):
    gcs, dashboard, client, agent = _free_ports(4)
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"))}
    env.update(auth, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")  # Ray then takes 127.0.0.1 as the node address
    cmd = [
        str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}", f"--num-cpus={num_cpus}",
        "--num-gpus=0", f"--object-store-memory={object_store_bytes}", f"--temp-dir={temp}",
    ]
    address = f"http://127.0.0.1:{dashboard}"
    with open(temp / "ray_start.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            _wait_ready(address, auth["RAY_AUTH_TOKEN"], proc, temp, timeout_s)
            yield Head(address, env)
        finally:
            _end_tree(proc)


def _wait_ready(address: str, token: str, proc: subprocess.Popen, temp: Path, timeout_s: float) -> None:
    """Until the head accepts a job: its job agent comes up seconds after the dashboard answers."""
    request = urllib.request.Request(
        f"{address}/api/jobs/", data=json.dumps({"entrypoint": "true"}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"}, method="POST")
    no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{(temp / 'ray_start.log').read_text()}")
        try:
            with no_proxy.open(request, timeout=10) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"the head at {address} accepted no job in {timeout_s:.0f} s")


def _end_tree(proc: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` (it stops what it started), then sweep the rest of its tree."""
    try:
        procs = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        procs = []
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()
