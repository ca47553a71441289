"""The checkpoint scheme: atomic folders, a completion marker checked on resume, tensors and state without pickle."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch

from ray_crm.checkpoint import (
    COMPLETE,
    file_manifest,
    latest_verified,
    load_state_tree,
    load_tensors,
    save_state_tree,
    save_tensors,
    verify_checkpoint,
    write_checkpoint,
    write_marker,
)


def _writer(payload: bytes):
    def write(folder: Path) -> None:
        (folder / "sub").mkdir()
        (folder / "weights.bin").write_bytes(payload)
        (folder / "sub" / "state.json").write_text('{"step": 1}')
    return write


def _fail(folder: Path) -> None:
    (folder / "weights.bin").write_bytes(b"half")
    raise RuntimeError("killed mid-write")


def test_a_written_checkpoint_verifies_and_leaves_no_temporary_folder(tmp_path):
    final = write_checkpoint(tmp_path, "step_000001", _writer(b"abc" * 100))
    assert final == tmp_path / "step_000001" and verify_checkpoint(final) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert set(file_manifest(final)) == {"weights.bin", "sub/state.json"}


def test_a_failed_write_keeps_the_previous_checkpoint_and_adds_none(tmp_path):
    write_checkpoint(tmp_path, "step_000001", _writer(b"old"))
    with pytest.raises(RuntimeError, match="killed"):
        write_checkpoint(tmp_path, "step_000002", _fail)
    with pytest.raises(RuntimeError, match="killed"):
        write_checkpoint(tmp_path, "step_000001", _fail)  # replacing it in place fails too
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000001"]
    assert (tmp_path / "step_000001" / "weights.bin").read_bytes() == b"old"
    assert latest_verified(tmp_path) == tmp_path / "step_000001"


def test_rewriting_a_name_replaces_it_and_a_crash_between_the_renames_loses_nothing(tmp_path):
    write_checkpoint(tmp_path, "step_000001", _writer(b"old"))
    write_checkpoint(tmp_path, "step_000001", _writer(b"new"))
    assert (tmp_path / "step_000001" / "weights.bin").read_bytes() == b"new"
    (tmp_path / "step_000001").rename(tmp_path / ".step_000001.old")  # moved aside, replacement never landed
    assert latest_verified(tmp_path) == tmp_path / "step_000001"
    assert verify_checkpoint(tmp_path / "step_000001") is None


def test_a_folder_without_its_marker_is_skipped(tmp_path, caplog):
    write_checkpoint(tmp_path, "step_000001", _writer(b"x"))
    unmarked = tmp_path / "step_000002"
    unmarked.mkdir()
    _writer(b"y")(unmarked)
    with caplog.at_level(logging.WARNING):
        assert latest_verified(tmp_path) == tmp_path / "step_000001"
    assert verify_checkpoint(unmarked) == f"no {COMPLETE}"
    assert "step_000002" in caplog.text and COMPLETE in caplog.text


def test_a_truncated_checkpoint_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    write_checkpoint(tmp_path, "step_000001", _writer(b"a" * 4096))
    newest = write_checkpoint(tmp_path, "step_000002", _writer(b"b" * 4096))
    weights = newest / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:-1])
    with caplog.at_level(logging.WARNING, logger="ray_crm.checkpoint"):
        assert latest_verified(tmp_path) == tmp_path / "step_000001"
    assert str(newest) in caplog.text and "weights.bin: size 4095 != 4096" in caplog.text


def test_same_size_corruption_and_missing_files_are_detected(tmp_path):
    folder = write_checkpoint(tmp_path, "step_000001", _writer(b"abcd"))
    (folder / "weights.bin").write_bytes(b"abce")
    assert verify_checkpoint(folder) == "weights.bin: sha256 differs"
    assert verify_checkpoint(folder, check_hashes=False) is None
    (folder / "sub" / "state.json").unlink()
    assert verify_checkpoint(folder, check_hashes=False) == "sub/state.json: missing"
    (folder / COMPLETE).write_text('{"files": ')  # the marker itself cut short
    assert "unreadable" in verify_checkpoint(folder)


def test_a_marker_listing_other_processes_files_verifies_once_they_arrive(tmp_path):
    """Ray merges every rank's folder into one checkpoint: rank 0's marker lists the shards of all ranks."""
    ranks = [tmp_path / "rank0", tmp_path / "rank1"]
    for rank, folder in enumerate(ranks):
        (folder / "ds").mkdir(parents=True)
        (folder / "ds" / f"shard_{rank}.safetensors").write_bytes(bytes([rank]) * 10)
    write_marker(ranks[0], "step_000005", {**file_manifest(ranks[0]), **file_manifest(ranks[1])})
    assert verify_checkpoint(ranks[0]) == "ds/shard_1.safetensors: missing"
    (ranks[1] / "ds" / "shard_1.safetensors").rename(ranks[0] / "ds" / "shard_1.safetensors")
    assert verify_checkpoint(ranks[0]) is None


def test_keep_prunes_the_oldest_folders_of_the_same_series(tmp_path):
    (tmp_path / "best").mkdir()
    for step in range(1, 6):
        write_checkpoint(tmp_path, f"step_{step:06d}", _writer(b"w"), keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "step_000004", "step_000005"]


def test_tensors_round_trip_through_safetensors_even_sharing_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32)
    tensors = {"whole": base, "view": base[2:6], "transposed": base.view(3, 4).t(),
               "bf16": torch.ones(3, dtype=torch.bfloat16), "scalar": torch.tensor(7, dtype=torch.int64)}
    save_tensors(tmp_path / "t.safetensors", tensors)
    back = load_tensors(tmp_path / "t.safetensors")
    assert set(back) == set(tensors)
    for key, tensor in tensors.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor)


def _adam_after_two_steps():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.Adam(model.parameters(), lr=0.01, betas=(0.8, 0.95))
    for _ in range(2):
        _step(model, opt)
    return model, opt


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.linspace(-1, 1, 12).view(3, 4)).pow(2).mean().backward()
    opt.step()


def test_an_adam_state_reloaded_from_the_state_tree_takes_the_identical_next_step(tmp_path):
    model, opt = _adam_after_two_steps()
    save_state_tree(tmp_path, "optimizer", opt.state_dict())
    state = load_state_tree(tmp_path, "optimizer")
    assert list(state["state"]) == list(opt.state_dict()["state"]) == [0, 1, 2, 3]  # int keys stay int
    assert state["param_groups"][0]["betas"] == (0.8, 0.95)
    for index, per_param in opt.state_dict()["state"].items():
        for key, tensor in per_param.items():
            assert state["state"][index][key].dtype == tensor.dtype and torch.equal(state["state"][index][key], tensor)

    twin = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.Adam(twin.parameters(), lr=0.5)  # hyper-parameters come back from the state too
    twin_opt.load_state_dict(state)
    _step(model, opt)
    _step(twin, twin_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


def test_the_state_tree_keeps_key_types_tuples_and_leaf_types(tmp_path):
    tree = {0: "int key", "0": "str key", "nested": [(1, 2.5, None), {"flag": True, "t": torch.ones(2)}],
            "empty": ({}, [], ()), "nan": float("inf")}
    save_state_tree(tmp_path, "tree", tree)
    back = load_state_tree(tmp_path, "tree")
    assert back[0] == "int key" and back["0"] == "str key" and list(back) == [0, "0", "nested", "empty", "nan"]
    assert back["nested"][0] == (1, 2.5, None) and isinstance(back["nested"][0], tuple)
    assert back["nested"][1]["flag"] is True and torch.equal(back["nested"][1]["t"], torch.ones(2))
    assert back["empty"] == ({}, [], ()) and back["nan"] == float("inf")
    assert type(back["nested"][0][1]) is float and type(back["nested"][0][0]) is int


def test_a_leaf_that_would_need_pickle_is_refused_by_its_path(tmp_path):
    with pytest.raises(TypeError, match="at optimizer/loss_scaler is a object"):
        save_state_tree(tmp_path, "s", {"optimizer": {"lr": 0.1, "loss_scaler": object()}})
    with pytest.raises(TypeError, match=r"key \(1, 2\) at groups/0"):
        save_state_tree(tmp_path, "s", {"groups": [{(1, 2): 3}]})


def test_nothing_is_pickled(tmp_path, monkeypatch):
    model, opt = _adam_after_two_steps()

    def write(folder: Path) -> None:
        save_tensors(folder / "model.safetensors", model.state_dict())
        save_state_tree(folder, "optimizer", opt.state_dict())

    folder = write_checkpoint(tmp_path, "step_000002", write)
    assert {p.suffix for p in folder.rglob("*")} == {".json", ".safetensors"}

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for module, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(module, name, refuse)
    assert latest_verified(tmp_path) == folder
    load_state_tree(folder, "optimizer")
    load_tensors(folder / "model.safetensors")


def test_the_rm_trainer_resumes_from_the_newest_ray_checkpoint_that_verifies(tmp_path, caplog):
    from ray_crm.train.rm_trainer import latest_complete_checkpoint

    def ray_checkpoint(stamp: str, shards: int) -> Path:  # rank 0's marker lists both ranks' shards
        folder = tmp_path / f"checkpoint_2026-12-02_11-56-{stamp}"
        (folder / "engine").mkdir(parents=True)
        for rank in range(2):
            (folder / "engine" / f"optim_rank{rank}.safetensors").write_bytes(b"s" * 64)
        (folder / "state.json").write_text('{"step": 5}')
        write_marker(folder, "step_000005")
        for rank in range(shards, 2):
            (folder / "engine" / f"optim_rank{rank}.safetensors").unlink()
        return folder

    assert latest_complete_checkpoint(tmp_path) is None
    good = ray_checkpoint("20.1", shards=2)
    ray_checkpoint("30.2", shards=1)  # a worker killed before uploading its shard
    with caplog.at_level(logging.WARNING):
        assert latest_complete_checkpoint(tmp_path) == good
    assert "checkpoint_2026-12-02_11-56-30.2" in caplog.text and "optim_rank1.safetensors: missing" in caplog.text
