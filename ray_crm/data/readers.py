"""Input files -> records with their line numbers (pure; the pipeline runs it inside Ray tasks).

Ray Data's own readers stop at the first malformed line and forget where a row came from, so each file is
read here with its line (JSONL, CSV) or row (Parquet, HF `datasets` shards) number, and nothing inside a file
makes a reader raise: a bad record comes back as an `Issue`, and a file, or the rest of one, that cannot be read
at all (a cut-off gzip stream, an unreadable Parquet footer or Arrow stream) as one `bad_file` Issue. Formats:
JSON lines (.jsonl/.json, optionally .gz), CSV with a header, Parquet, and a folder saved by
`datasets.Dataset.save_to_disk` (Arrow stream shards).

A file is read in `Piece`s, each by its own task, and streamed in CHUNK_BYTES steps, so a task's memory does
not grow with the file. `scan` makes one streaming pass over a file: its size and hash for the manifest, and
its pieces: plain JSONL is cut into byte ranges of about RANGE_BYTES that end just after a newline, each with
the number of its first line (newlines counted on the way), and Parquet into runs of whole row groups. A gzip
stream has no random access, an Arrow stream must be read in order, and in CSV a quoted field may span lines,
so that a newline is no record boundary without parsing all before it: those are one piece each (streamed;
gzipped Parquet or Arrow, which need random access, are decompressed into memory).
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import io
import json
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

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
RANGE_BYTES = 16 << 20  # of a piece, the unit of parallel reading (Parquet: uncompressed row group bytes)
CHUNK_BYTES = 1 << 20  # read at a time: with one block of rows, what a reading task holds
GZIP_STEP = 1 << 16  # decompressed at a time: what is lost at a break in the stream


@dataclass(frozen=True)
class Piece:
    """What one task reads of a file: bytes [start, stop) from line `first` (plain JSONL), or row groups
    [start, stop) from row `first` (Parquet); `stop` None reads to the end."""

    start: int = 0
    stop: int | None = None
    first: int = 1


WHOLE = Piece()


@dataclass(frozen=True)
class Scan:
    """What the driver learns of an input before reading it."""

    size: int
    sha256: str
    pieces: tuple[Piece, ...]


def scan(source: BinaryIO, file: InputFile, range_bytes: int) -> Scan:
    """One streaming pass over a file: its size and hash (for the manifest), and the pieces to read it in."""
    digest, size = hashlib.sha256(), 0
    cuts = _LineCuts(range_bytes) if file.format == "jsonl" and not _gzipped(file) else None
    while chunk := source.read(CHUNK_BYTES):
        digest.update(chunk)
        size += len(chunk)
        if cuts:
            cuts.feed(chunk)
    if cuts:
        pieces = cuts.pieces(size)
    elif file.format == "parquet" and not _gzipped(file):
        source.seek(0)
        pieces = _row_group_pieces(source, range_bytes)
    else:
        pieces = [WHOLE]
    return Scan(size, digest.hexdigest(), tuple(pieces))


class _LineCuts:
    """Where to cut a JSONL file: offsets just past a newline, at least `range_bytes` apart, each with the number
    of the line it starts; fed the file's chunks in order, it holds the cuts, not the bytes."""

    def __init__(self, range_bytes: int) -> None:
        self._range = range_bytes
        self._starts = [(0, 1)]  # (byte offset, line number)
        self._pos = 0  # bytes fed
        self._lines = 0  # newlines fed

    def feed(self, chunk: bytes) -> None:
        counted = 0
        at = max(self._starts[-1][0] + self._range - 1 - self._pos, 0)  # a range holds at least range_bytes
        while (newline := chunk.find(b"\n", at)) >= 0:
            self._lines += chunk.count(b"\n", counted, newline + 1)
            counted = newline + 1
            self._starts.append((self._pos + counted, self._lines + 1))
            at = newline + self._range
        self._lines += chunk.count(b"\n", counted)
        self._pos += len(chunk)

    def pieces(self, size: int) -> list[Piece]:
        starts = [s for s in self._starts if s[0] < size] or [(0, 1)]  # no empty range after a final newline
        stops = [offset for offset, _ in starts[1:]] + [None]
        return [Piece(offset, stop, line) for (offset, line), stop in zip(starts, stops)]


def _row_group_pieces(source: BinaryIO, range_bytes: int) -> list[Piece]:
    """Runs of whole row groups of about `range_bytes` uncompressed; one piece when the footer cannot be
    trusted (its task then reports the file)."""
    footer = _open_parquet(source)
    if isinstance(footer, str):
        return [WHOLE]
    parquet, sizes = footer
    pieces, start, first, held = [], 0, 1, 0
    for group in range(len(sizes)):
        held += parquet.metadata.row_group(group).total_byte_size
        if held >= range_bytes or group == len(sizes) - 1:
            pieces.append(Piece(start, group + 1, first))
            first += sum(sizes[start: group + 1])
            start, held = group + 1, 0
    return pieces or [WHOLE]


def _open_parquet(source: BinaryIO) -> tuple[pq.ParquetFile, list[int]] | str:
    """The file and its row groups' row counts, or why its footer cannot be trusted."""
    try:
        parquet = pq.ParquetFile(source, page_checksum_verification=True)
        sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.metadata.num_row_groups)]
    except _ARROW_ERRORS as exc:
        return f"not a readable Parquet file: {exc}"
    if min(sizes, default=0) < 0 or sum(sizes) != parquet.metadata.num_rows:
        return f"the Parquet footer's row counts disagree: {sizes}, total {parquet.metadata.num_rows}"
    return parquet, sizes


def _gzipped(file: InputFile) -> bool:
    return file.path.endswith(".gz")


def _byte_range(source: BinaryIO, piece: Piece) -> Iterator[bytes]:
    source.seek(piece.start)
    left = sys.maxsize if piece.stop is None else piece.stop - piece.start
    while left > 0 and (chunk := source.read(min(CHUNK_BYTES, left))):
        left -= len(chunk)
        yield chunk


def _json_record(line: bytes) -> tuple[dict[str, Any] | Issue, str]:
    """A non-blank line's record or why it is none, and its text."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Issue("undecodable", None, f"line is not UTF-8 (byte {exc.start})"), line.decode(
            "utf-8", "backslashreplace")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        return Issue("malformed", None, f"invalid JSON: {exc.msg} (column {exc.colno})"), text
    except RecursionError:
        return Issue("malformed", None, "JSON nested too deeply to read"), text
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        return Issue("malformed", None, f"invalid JSON: {exc}"), text
    if not isinstance(record, dict):
        return Issue("malformed", None, f"a JSON {type(record).__name__} where an object was expected"), text
    return record, text


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
    """The records of one piece of a file (iterate once), and `count`: how many records the piece holds.

    `count` is found apart from parsing wherever the format allows (non-blank JSON lines, Parquet metadata row
    counts), else as the decoder yields them (CSV records, Arrow batches), plus one for a part that cannot be
    read; it is final once iteration ends. Every counted record comes out exactly once, as a dict or an Issue,
    so a reader that loses a record is caught (`parse_file` compares).
    """

    def __init__(self, source: BinaryIO, file: InputFile, piece: Piece = WHOLE) -> None:
        self.file = file
        self.piece = piece
        self.count = 0
        self._source = source
        self._cut: str | None = None  # why the gzip stream breaks off, once it has
        self._tail = b""  # the partial line at the cut
        self._newlines = 0  # in the whole lines read

    def __iter__(self) -> Iterator[Record]:
        if self.file.format in ("jsonl", "csv"):
            read = self._jsonl if self.file.format == "jsonl" else self._csv
            yield from read(self._blocks())
            if self._cut is not None:  # the whole lines before the cut were read
                tail = self._tail[:TAIL_BYTES].decode("utf-8", "backslashreplace")
                yield from self._bad_file(self.piece.first + self._newlines, self._cut, tail)
            return
        source = self._source
        if _gzipped(self.file):
            source = io.BytesIO(b"".join(self._gunzip()))
            if self._cut is not None:  # a binary file's start is of no use without its end (a Parquet footer)
                yield from self._bad_file(0, self._cut)
                return
        yield from (self._parquet if self.file.format == "parquet" else self._arrow_stream)(source)

    def _gunzip(self) -> Iterator[bytes]:
        """The decompressed bytes; a break in the stream ends them, and is kept as `_cut`."""
        try:
            with gzip.GzipFile(fileobj=self._source) as fh:
                while part := fh.read1(GZIP_STEP):
                    yield part
        except (OSError, EOFError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
            self._cut = f"the gzip stream breaks off: {exc}"

    def _blocks(self) -> Iterator[bytes]:
        """The piece's text in blocks of whole lines (a long line spans chunks), then the last line if it has no
        newline - unless the stream broke off in it: that partial line is kept as `_tail`."""
        chunks = self._gunzip() if _gzipped(self.file) else _byte_range(self._source, self.piece)
        rest: list[bytes] = []
        for chunk in chunks:
            end = chunk.rfind(b"\n") + 1
            if not end:
                rest.append(chunk)
                continue
            block = b"".join([*rest, chunk[:end]])
            self._newlines += block.count(b"\n")
            yield block
            rest = [chunk[end:]]
        if self._cut is None:
            yield b"".join(rest)
        else:
            self._tail = b"".join(rest)

    def _bad_file(self, line: int, detail: str, raw: str | None = None) -> Iterator[Record]:
        self.count += 1
        yield line, Issue("bad_file", None, detail), raw

    def _jsonl(self, blocks: Iterable[bytes]) -> Iterator[Record]:
        line_no = self.piece.first
        for block in blocks:
            lines = block.split(b"\n")
            if not lines[-1]:
                lines.pop()  # what follows a block's final newline, or an empty last block
            self.count += sum(1 for line in lines if line.strip())
            for line in lines:
                if line.strip():  # a blank line is not a record
                    yield line_no, *_json_record(line.rstrip(b"\r"))
                line_no += 1

    def _csv(self, blocks: Iterable[bytes]) -> Iterator[Record]:
        # surrogateescape keeps undecodable bytes visible to the per-field UTF-8 check instead of failing the file.
        # Blocks end at a newline, so none splits a character or a \r\n: each decodes and splits into lines as
        # the whole text would.
        decoder = codecs.getincrementaldecoder("utf-8-sig")("surrogateescape")
        lines = (line for block in blocks for line in io.StringIO(decoder.decode(block, final=True), newline=""))
        # A response may well exceed the csv module's 128 KiB field limit, and the file is streamed, so the limit
        # is lifted: it was the one csv.Error a non-strict reader of text can raise.
        csv.field_size_limit(sys.maxsize)
        reader = csv.reader(lines)
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

    def _parquet(self, source: BinaryIO) -> Iterator[Record]:
        """The piece's row groups, read apart: the rows of one that cannot be decoded are Issues, the others
        are read."""
        footer = _open_parquet(source)
        if isinstance(footer, str):
            yield from self._bad_file(0, footer)
            return
        parquet, sizes = footer
        groups = range(self.piece.start, len(sizes) if self.piece.stop is None else self.piece.stop)
        self.count += sum(sizes[g] for g in groups)
        first = self.piece.first
        for group in groups:
            row = first
            try:
                for batch in parquet.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                    yield from _convert(batch, row)
                    row += batch.num_rows
            except _ARROW_ERRORS as exc:
                issue = Issue("unreadable", None, f"row group {group} cannot be decoded from row {row} on: {exc}")
                yield from ((r, issue, None) for r in range(row, first + sizes[group]))
            first += sizes[group]

    def _arrow_stream(self, source: BinaryIO) -> Iterator[Record]:
        """An Arrow stream has no row count, and its batches must be read in order: the first one that cannot be
        read ends the file."""
        row = 1
        try:
            for batch in pa.ipc.open_stream(source):
                batch.validate(full=True)  # to_pylist trusts the offsets and lengths the file holds
                self.count += batch.num_rows
                yield from _convert(batch, row)
                row += batch.num_rows
        except _ARROW_ERRORS as exc:
            yield from self._bad_file(row, f"the Arrow stream cannot be read from row {row} on: {exc}")


def iter_records(source: BinaryIO, file: InputFile, piece: Piece = WHOLE) -> FileRecords:
    """The records of one piece of a file (an iterable that also counts them; see `FileRecords`)."""
    return FileRecords(source, file, piece)
