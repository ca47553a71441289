"""The main job's console: one line per stage, everything a stage prints (Python, C-level writes, child processes)
in the log file, and the terminal back as it was after a stage, even one that fails."""

import os
import subprocess
import sys

import pytest

from ray_crm.console import StageConsole


def _noisy() -> int:
    print("python print")
    print("python stderr", file=sys.stderr)
    os.write(1, b"fd write\n")
    subprocess.run(["sh", "-c", "echo child stdout; echo child stderr >&2"], check=True)
    return 7


def test_a_stage_prints_one_line_and_its_output_goes_to_the_log(tmp_path, capfd):
    console = StageConsole(tmp_path / "run.log", total=2)
    assert console.stage("prepare", _noisy) == 7
    print("after the stage")
    console.close()
    out, err = capfd.readouterr()
    log = (tmp_path / "run.log").read_text()
    for line in ("python print", "python stderr", "fd write", "child stdout", "child stderr"):
        assert line in log and line not in out + err
    assert out.startswith("[1/2] prepare") and out.count("\n") == 2 and "after the stage" in out
    assert console.seconds["prepare"] >= 0


def test_quiet_work_writes_to_the_log_and_prints_no_progress_line(tmp_path, capfd):
    """What the demo does with Ray's shutdown, whose log deduplicator prints its last lines then."""
    console = StageConsole(tmp_path / "run.log", total=1)
    assert console.quietly(_noisy) == 7
    console.close()
    out, err = capfd.readouterr()
    assert out + err == "" and "child stderr" in (tmp_path / "run.log").read_text()


def test_a_failing_stage_says_so_and_gives_the_terminal_back(tmp_path, capfd):
    console = StageConsole(tmp_path / "run.log", total=1)

    def broken():
        print("partial output")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        console.stage("train-rm/vanilla", broken)
    print("still here")
    out, _ = capfd.readouterr()
    assert "train-rm/vanilla" in out and "failed after" in out and str(tmp_path / "run.log") in out
    assert "still here" in out and "partial output" not in out
    assert "partial output" in (tmp_path / "run.log").read_text()
    assert "train-rm/vanilla" not in console.seconds


def test_verbose_leaves_the_output_on_the_terminal(tmp_path, capfd):
    console = StageConsole(tmp_path / "run.log", total=1, verbose=True)
    console.stage("bench", _noisy)
    out, err = capfd.readouterr()
    assert "python print" in out and "child stderr" in err and "[1/1] bench" in out
    assert not (tmp_path / "run.log").exists()


def test_a_logging_handler_made_during_a_stage_keeps_working_after_it(tmp_path, capfd):
    """Ray sets up its logging handler the first time a stage starts it, on the stream the stage had as stderr;
    the records of later stages must land in the log, not as "Logging error" tracebacks on a closed file."""
    import logging

    log = logging.getLogger("ray_crm.test_console")
    log.propagate = False
    console = StageConsole(tmp_path / "run.log", total=2)
    try:
        console.stage("prepare", lambda: log.addHandler(logging.StreamHandler()))
        console.stage("train-rm", lambda: log.warning("a record of the next stage"))
    finally:
        for handler in log.handlers[:]:
            log.removeHandler(handler)
        console.close()
    out, err = capfd.readouterr()
    text = (tmp_path / "run.log").read_text()
    assert "a record of the next stage" in text
    assert "Logging error" not in text + out + err
