"""One checkpoint scheme for every training stage: whole folders or nothing, and no pickle.

A checkpoint is a folder written under a temporary name and renamed into place. Its last file, `COMPLETE.json`,
lists every other file with its size and sha256, so a folder cut short by a crash, a full disk or a partial copy
is recognised on resume and skipped for the one before. Tensors are stored with safetensors and everything else
as JSON, so loading a checkpoint never unpickles (a pickle can run arbitrary code).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

COMPLETE = "COMPLETE.json"

logger = logging.getLogger(__name__)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries (so a rename survives a power cut)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under `folder` but its marker, keyed by relative POSIX path."""
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / COMPLETE}


def write_marker(folder: Path, name: str, files: dict[str, dict[str, Any]] | None = None) -> None:
    """Write `COMPLETE.json` after syncing the files it lists (by default every file now in `folder`).

    Pass `files` when several processes fill one checkpoint (each rank its shard): the marker then lists
    files this process never wrote, and the checkpoint verifies only once every one of them has arrived.
    """
    files = file_manifest(folder) if files is None else files
    for rel in files:
        if (folder / rel).is_file():
            _fsync(folder / rel)
    marker = folder / COMPLETE
    marker.write_text(json.dumps({"name": name, "created": time.time(), "files": files}, indent=1))
    _fsync(marker)
    _fsync(folder)


def _restore_aside(root: Path) -> None:
    """Put back a checkpoint moved aside by a `write_checkpoint` that crashed before its replacement landed."""
    for aside in root.glob(".*.old"):
        target = root / aside.name[1 : -len(".old")]
        if not target.exists():
            aside.rename(target)


def write_checkpoint(root: Path, name: str, write: Callable[[Path], None], keep: int | None = None) -> Path:
    """`write(folder)` fills a temporary folder, which becomes `root/name` only once its marker is written.

    An existing `root/name` is renamed aside, not deleted, until the new one is in place. With `keep`, only
    the newest `keep` folders named like `name` (same prefix, e.g. `step_`) are kept. Returns `root/name`.
    """
    root.mkdir(parents=True, exist_ok=True)
    _restore_aside(root)
    tmp, final, aside = root / f".{name}.tmp", root / name, root / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        write_marker(tmp, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        final.rename(aside)
    tmp.rename(final)
    _fsync(root)
    shutil.rmtree(aside, ignore_errors=True)
    if keep is not None:
        _prune(root, name, keep)
    return final


def _prune(root: Path, name: str, keep: int) -> None:
    """Delete all but the newest `keep` folders sharing `name`'s prefix (never `name` itself)."""
    prefix = re.sub(r"\d+$", "", name)
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)
                     and not p.name.startswith("."))
    for old in folders[: max(len(folders) - keep, 0)]:
        if old != name:
            shutil.rmtree(root / old)


def verify_checkpoint(folder: Path, check_hashes: bool = True) -> str | None:
    """None if `folder` holds every file its marker lists, as written; else why not."""
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
    except FileNotFoundError:
        return f"no {COMPLETE}"
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{COMPLETE} unreadable: {err!r}"
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel}: missing"
        size = path.stat().st_size
        if size != want["size"]:
            return f"{rel}: size {size} != {want['size']}"
        if check_hashes and _sha256(path) != want["sha256"]:
            return f"{rel}: sha256 differs"
    return None


def latest_verified(root: Path, pattern: str = "step_*") -> Path | None:
    """The last folder by name matching `pattern` that verifies; each newer one that fails is logged and skipped."""
    if not root.is_dir():
        return None
    _restore_aside(root)
    folders = [p for p in root.glob(pattern) if p.is_dir() and not p.name.startswith(".")]
    for folder in sorted(folders, key=lambda p: p.name, reverse=True):
        reason = verify_checkpoint(folder)
        if reason is None:
            return folder
        logger.warning("skipping checkpoint %s: %s", folder, reason)
    return None


def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """safetensors wants contiguous CPU tensors with storage of their own: views of one storage are cloned."""
    seen, out = set(), {}
    for key, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        storage = tensor.untyped_storage().data_ptr()
        out[key] = tensor.clone() if storage in seen else tensor
        seen.add(storage)
    save_file(out, str(path))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path), device="cpu")


def _child(path: str, key: Any) -> str:
    return f"{path}/{key}" if path else str(key)


def _encode(node: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON for `node`: containers become one-key tagged objects (a JSON scalar is never an object),
    dicts a list of [key, value] pairs so int keys stay int, tensors a reference into `tensors`."""
    if isinstance(node, torch.Tensor):
        key = path
        while key in tensors:  # keys 0 and "0" give one path
            key += "#"
        tensors[key] = node
        return {"tensor": key}
    if node is None or isinstance(node, (bool, str)):
        return node
    if isinstance(node, int):  # an IntEnum (DeepSpeed's ZeroStageEnum) comes back as its plain int
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, dict):
        for key in node:
            if type(key) not in (str, int):
                raise TypeError(f"state tree key {key!r} at {path or '<root>'}: only str and int keys are stored")
        return {"dict": [[k, _encode(v, _child(path, k), tensors)] for k, v in node.items()]}
    if isinstance(node, (list, tuple)):
        items = [_encode(v, _child(path, i), tensors) for i, v in enumerate(node)]
        return {"tuple" if isinstance(node, tuple) else "list": items}
    raise TypeError(f"state tree leaf at {path or '<root>'} is a {type(node).__qualname__}: "
                    "only tensors, numbers, strings, bools and None are stored (convert or drop it)")


def _decode(node: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(node, dict):
        return node
    (tag, value), = node.items()
    if tag == "tensor":
        return tensors[value]
    if tag == "dict":
        return {k: _decode(v, tensors) for k, v in value}
    items = [_decode(v, tensors) for v in value]
    return tuple(items) if tag == "tuple" else items


def save_state_tree(folder: Path, stem: str, tree: Any) -> None:
    """Store a nested dict/list/tuple of tensors and plain values (an optimizer's `state_dict()`) as
    `<stem>.safetensors` (tensors keyed by their path in the tree) + `<stem>.json` (the rest)."""
    tensors: dict[str, torch.Tensor] = {}
    encoded = _encode(tree, "", tensors)
    save_tensors(folder / f"{stem}.safetensors", tensors)
    (folder / f"{stem}.json").write_text(json.dumps(encoded))


def load_state_tree(folder: Path, stem: str) -> Any:
    return _decode(json.loads((folder / f"{stem}.json").read_text()), load_tensors(folder / f"{stem}.safetensors"))
