"""The output folder's lock (one writer, named; a dead holder's lock taken over) and its swap (a failed or killed
run leaves the previous output as it was)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import warnings
from contextlib import ExitStack
from pathlib import Path

import pytest

from ray_crm.data.outdir import OutputBusy, output_lock, staged_output

OWNED = {"train", "manifest.json"}
HOLD = """
import sys, time
from pathlib import Path
from ray_crm.data.outdir import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(120)
"""


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_output(folder: Path, text: str) -> None:
    (folder / "train").mkdir(parents=True, exist_ok=True)
    (folder / "train" / "part-0.parquet").write_text(text)
    (folder / "manifest.json").write_text(text)


def test_a_second_run_fails_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    out = tmp_path / "prepare"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).parents[2])
    try:
        assert holder.stdout.readline() == "held\n"
        busy = rf"pid {holder.pid} on {socket.gethostname()} \(started 20"
        with pytest.raises(OutputBusy, match=busy), output_lock(out):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no chance to release the lock file
        holder.wait()
    stale = rf"taking over the stale lock .*\.prepare\.lock: pid {holder.pid} on"
    with ExitStack() as held:
        with pytest.warns(UserWarning, match=stale):
            held.enter_context(output_lock(out))
        with pytest.raises(OutputBusy, match=rf"pid {os.getpid()} on"), output_lock(out):  # held by this process
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # released cleanly: the next run takes it without a warning
        with output_lock(out):
            pass


def test_the_new_output_replaces_the_old_only_on_success(tmp_path):
    out = tmp_path / "prepare"
    write_output(out, "old")
    before = tree(out)
    with pytest.raises(RuntimeError, match="mid-write"), staged_output(out, OWNED) as work:
        write_output(work, "new")
        raise RuntimeError("mid-write")
    assert tree(out) == before  # the previous output is untouched
    assert tree(work) == {"manifest.json": b"new", "train/part-0.parquet": b"new"}  # kept for inspection

    with staged_output(out, OWNED) as again:
        assert again == work and not any(work.iterdir())  # the failed run's folder is cleared first
        (again / "manifest.json").write_text("newer")
    assert tree(out) == {"manifest.json": b"newer"} and sorted(p.name for p in tmp_path.iterdir()) == ["prepare"]


def test_a_swap_killed_halfway_is_undone_first(tmp_path):
    out = tmp_path / "prepare"
    write_output(tmp_path / ".prepare.old", "old")  # killed after moving the old output aside
    with pytest.raises(RuntimeError), staged_output(out, OWNED):
        raise RuntimeError
    assert tree(out) == {"manifest.json": b"old", "train/part-0.parquet": b"old"}


def test_a_folder_holding_other_files_is_not_replaced(tmp_path):
    out = tmp_path / "data"
    write_output(out, "old")
    (out / "my_pairs.jsonl").write_text("{}")
    before = tree(out)
    with pytest.raises(FileExistsError, match=r"\['my_pairs.jsonl'\], which this stage does not write"), \
            staged_output(out, OWNED):
        pass
    assert tree(out) == before
