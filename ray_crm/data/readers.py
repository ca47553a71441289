"""Input files -> records with their line numbers (pure; the pipeline runs it inside Ray tasks).

Ray Data's own readers stop at the first malformed line and forget where a row came from, so each file is
read here with its line (JSONL, CSV) or row (Parquet, HF `datasets` shards) number, and nothing inside a file
makes a reader raise: a bad record comes back as an `Issue`, and a file, or the rest of one, that cannot be read
at all (a cut-off gzip stream, an unreadable Parquet footer or Arrow stream) as one `bad_file` Issue. Formats:
JSON lines (.jsonl/.json, optionally .gz), CSV with a header, Parquet, and a folder saved by
`datasets.Dataset.save_to_disk` (Arrow stream shards).
"""

from __future__ import annotations

import csv
import glob
import gzip
import io
import json
import zlib
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


# What pyarrow raises for bytes it cannot decode: ArrowInvalid is a ValueError, ArrowIOError and thrift
# errors are OSErrors, others (e.g. ArrowNotImplementedError) are ArrowExceptions.
_ARROW_ERRORS = (pa.ArrowException, OSError, ValueError)
BATCH_ROWS = 4096
TAIL_BYTES = 2000  # of the partial line at a gzip cut, kept as its raw text


def _gunzip(data: bytes) -> tuple[bytes, str | None]:
    """The decompressed bytes, and why the stream breaks off if it does: what came before the break is kept."""
    parts: list[bytes] = []
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
            while part := fh.read1(1 << 16):  # small steps: little is lost at a break
                parts.append(part)
    except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        return b"".join(parts), f"the gzip stream breaks off: {exc}"
    return b"".join(parts), None


def _convert(batch: pa.RecordBatch, first: int) -> Iterator[Record]:
    """A batch's rows as dicts; a row whose values have no Python form (a date beyond year 9999) is an Issue."""
    try:
        records: list[dict[str, Any] | Issue] = batch.to_pylist()
    except (pa.ArrowException, ValueError, OverflowError):
        records = [_convert_row(batch, i) for i in range(batch.num_rows)]
    for i, record in enumerate(records):
        yield first + i, record, None


def _convert_row(batch: pa.RecordBatch, i: int) -> dict[str, Any] | Issue:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except (pa.ArrowException, ValueError, OverflowError) as exc:
        return Issue("unreadable", None, f"the row has a value Python cannot hold: {exc}")


class FileRecords:
    """The records of one file's bytes (iterate once), and `count`: how many records the file holds.

    `count` is found apart from parsing wherever the format allows (non-blank JSON lines, Parquet metadata row
    counts), else as the decoder yields them (CSV records, Arrow batches), plus one for a part that cannot be
    read; it is final once iteration ends. Every counted record comes out exactly once, as a dict or an Issue,
    so a reader that loses a record is caught (`parse_file` compares).
    """

    def __init__(self, data: bytes, file: InputFile) -> None:
        self.file = file
        self.count = 0
        self._cut: str | None = None
        if file.path.endswith(".gz"):
            data, self._cut = _gunzip(data)
        self._data = data

    def __iter__(self) -> Iterator[Record]:
        read = {"jsonl": self._jsonl, "csv": self._csv, "parquet": self._parquet, "hf": self._arrow_stream}
        if self._cut is None:
            yield from read[self.file.format](self._data)
        elif self.file.format in ("jsonl", "csv"):  # the whole lines before the cut are read
            whole = self._data[: self._data.rfind(b"\n") + 1]
            yield from read[self.file.format](whole)
            tail = self._data[len(whole): len(whole) + TAIL_BYTES].decode("utf-8", "backslashreplace")
            yield from self._bad_file(whole.count(b"\n") + 1, self._cut, tail)
        else:  # a binary file's start is of no use without its end (a Parquet footer)
            yield from self._bad_file(0, self._cut)

    def _bad_file(self, line: int, detail: str, raw: str | None = None) -> Iterator[Record]:
        self.count += 1
        yield line, Issue("bad_file", None, detail), raw

    def _jsonl(self, data: bytes) -> Iterator[Record]:
        lines = data.split(b"\n")
        self.count += sum(1 for line in lines if line.strip())
        for line_no, line in enumerate(lines, 1):
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
            except RecursionError:
                yield line_no, Issue("malformed", None, "JSON nested too deeply to read"), text
                continue
            except ValueError as exc:  # e.g. an integer of more than 4,300 digits
                yield line_no, Issue("malformed", None, f"invalid JSON: {exc}"), text
                continue
            if not isinstance(record, dict):
                yield line_no, Issue("malformed", None, f"a JSON {type(record).__name__} where an object was "
                                                        f"expected"), text
                continue
            yield line_no, record, text

    def _csv(self, data: bytes) -> Iterator[Record]:
        # surrogateescape keeps undecodable bytes visible to the per-field UTF-8 check instead of failing the file
        text = data.decode("utf-8-sig", "surrogateescape")
        # A response may well exceed the csv module's 128 KiB field limit; no field can exceed the file. Lifted,
        # the limit was the one csv.Error a non-strict reader of a str can raise.
        csv.field_size_limit(max(csv.field_size_limit(), len(text)))
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not row:
                continue  # a blank line is not a record
            self.count += 1
            if len(row) != len(header):
                raw = json.dumps(row)
                yield line, Issue("malformed", None, f"{len(row)} fields where the header has {len(header)}"), raw
                continue
            yield line, dict(zip(header, row)), None

    def _parquet(self, data: bytes) -> Iterator[Record]:
        """Row groups are read apart: the rows of one that cannot be decoded are Issues, the others are read."""
        try:
            parquet = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
        except _ARROW_ERRORS as exc:
            yield from self._bad_file(0, f"not a readable Parquet file: {exc}")
            return
        if min(sizes, default=0) < 0 or sum(sizes) != parquet.metadata.num_rows:
            yield from self._bad_file(0, f"the Parquet footer's row counts disagree: {sizes}, total "
                                         f"{parquet.metadata.num_rows}")
            return
        self.count += sum(sizes)
        first = 1
        for group, size in enumerate(sizes):
            row = first
            try:
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                    yield from _convert(batch, row)
                    row += batch.num_rows
            except _ARROW_ERRORS as exc:
                issue = Issue("unreadable", None, f"row group {group} cannot be decoded from row {row} on: {exc}")
                yield from ((r, issue, None) for r in range(row, first + size))
            first += size

    def _arrow_stream(self, data: bytes) -> Iterator[Record]:
        """An Arrow stream has no row count, and its batches must be read in order: the first one that cannot be
        read ends the file."""
        row = 1
        try:
            for batch in pa.ipc.open_stream(pa.BufferReader(data)):
                batch.validate(full=True)  # to_pylist trusts the offsets and lengths the file holds
                self.count += batch.num_rows
                yield from _convert(batch, row)
                row += batch.num_rows
        except _ARROW_ERRORS as exc:
            yield from self._bad_file(row, f"the Arrow stream cannot be read from row {row} on: {exc}")


def iter_records(data: bytes, file: InputFile) -> FileRecords:
    """The records of one file's bytes (an iterable that also counts them; see `FileRecords`)."""
    return FileRecords(data, file)
