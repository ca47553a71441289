"""Input files -> records with their line numbers (pure; the pipeline runs it inside Ray tasks).

Ray Data's own readers stop at the first malformed line and forget where a row came from, so each file is
read here with its line (JSONL, CSV) or row (Parquet, HF `datasets` shards) number and a bad record comes
back as an `Issue` instead of an exception. Formats: JSON lines (.jsonl/.json, optionally .gz), CSV with a
header, Parquet, and a folder saved by `datasets.Dataset.save_to_disk` (Arrow stream shards).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ray_crm.data.pairs import Issue

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet", ".arrow": "hf"}
Record = tuple[int, dict[str, Any] | Issue, str | None]  # (line or row, record or issue, raw text if at hand)


@dataclass(frozen=True)
class InputFile:
    path: str  # absolute
    format: str  # jsonl | csv | parquet | hf
    split: str | None  # given by data.paths as a mapping, else None
    index: int  # position among all inputs: "first" for duplicates means lowest (index, line)


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffixes[-2] if path.suffix == ".gz" and len(path.suffixes) > 1 else path.suffix
    if suffix.lower() not in FORMATS:
        raise ValueError(f"{path}: unknown file type '{suffix}'; set data.format (one of {sorted(set(FORMATS.values()))})")
    return FORMATS[suffix.lower()]


def _hf_shards(folder: Path) -> list[Path]:
    if (folder / "dataset_dict.json").exists():
        splits = json.loads((folder / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{folder} is a saved DatasetDict; name one split folder, e.g. {folder / splits[0]}"
                         if splits else f"{folder} is a saved DatasetDict with no splits")
    state = json.loads((folder / "state.json").read_text())
    return [folder / f["filename"] for f in state["_data_files"]]


def _files_of(entry: str, fmt: str) -> list[Path]:
    matches = sorted(glob.glob(entry)) if any(c in entry for c in "*?[") else [entry]
    if not matches or not all(Path(m).exists() for m in matches):
        raise FileNotFoundError(f"data.paths: no such file or folder: {entry}")
    files: list[Path] = []
    for m in map(Path, matches):
        if m.is_dir() and ((m / "state.json").exists() or (m / "dataset_dict.json").exists()):
            files += _hf_shards(m)
        elif m.is_dir():
            files += sorted(p for p in m.rglob("*") if p.is_file() and (fmt != "auto" or _known(p)))
        else:
            files.append(m)
    return files


def _known(path: Path) -> bool:
    try:
        _format_of(path, "auto")
        return True
    except ValueError:
        return False


def expand_inputs(paths: list[str] | dict[str, list[str]], fmt: str = "auto") -> list[InputFile]:
    """Every input file, in config order, with its format and (for a split mapping) its split."""
    groups = paths.items() if isinstance(paths, dict) else [(None, paths)]
    out: list[InputFile] = []
    for split, entries in groups:
        for entry in entries:
            for f in _files_of(str(entry), fmt):
                path = str(f.resolve())
                if any(o.path == path for o in out):
                    raise ValueError(f"data.paths: {path} is listed twice")
                out.append(InputFile(path, _format_of(f, fmt), split, len(out)))
    if not out:
        raise FileNotFoundError(f"data.paths names no input files: {paths}")
    return out


def _jsonl(data: bytes) -> Iterator[Record]:
    for line_no, line in enumerate(data.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue  # a blank line is not a record
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield line_no, Issue("undecodable", None, f"line is not UTF-8 (byte {exc.start})"), line.decode(
                "utf-8", "backslashreplace")
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            yield line_no, Issue("malformed", None, f"invalid JSON: {exc.msg} (column {exc.colno})"), text
            continue
        if not isinstance(record, dict):
            yield line_no, Issue("malformed", None, f"a JSON {type(record).__name__} where an object was expected"), text
            continue
        yield line_no, record, text


def _csv(data: bytes) -> Iterator[Record]:
    # surrogateescape keeps undecodable bytes visible to the per-field UTF-8 check instead of failing the file
    reader = csv.reader(io.StringIO(data.decode("utf-8-sig", "surrogateescape"), newline=""))
    header = next(reader, None)
    if header is None:
        return
    start = reader.line_num + 1
    for row in reader:
        line, start = start, reader.line_num + 1
        if not row:
            continue
        if len(row) != len(header):
            raw = json.dumps(row)
            yield line, Issue("malformed", None, f"{len(row)} fields where the header has {len(header)}"), raw
            continue
        yield line, dict(zip(header, row)), None


def _arrow_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[Record]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield row, record, None


def iter_records(data: bytes, file: InputFile) -> Iterator[Record]:
    """The records of one file's bytes; an unreadable Parquet/Arrow file raises naming the file."""
    if file.path.endswith(".gz"):
        data = gzip.decompress(data)
    if file.format == "jsonl":
        return _jsonl(data)
    if file.format == "csv":
        return _csv(data)
    try:
        if file.format == "parquet":
            return _arrow_batches(pq.ParquetFile(pa.BufferReader(data)).iter_batches(batch_size=4096))
        return _arrow_batches(iter(pa.ipc.open_stream(pa.BufferReader(data))))
    except pa.ArrowException as exc:
        raise ValueError(f"{file.path}: not a readable {file.format} file: {exc}") from exc
