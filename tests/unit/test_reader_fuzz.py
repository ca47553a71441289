"""Fuzzed input files: whatever the bytes, a reader never raises and accounts for every record it counted.

Valid JSONL, CSV, Parquet and Arrow-stream files (JSONL and CSV also gzipped) are built from random pairs, then
damaged: cut short, overwritten with random bytes, or spliced with random bytes, bad UTF-8, a line nested
thousands deep or a 200 KiB field. Every file must give exactly as many rows (records + Issues) as its reader
counted, that count must be what the format says where the test can know it (non-blank lines, Parquet
metadata), and an undamaged file must read back exactly. Text is streamed in chunks of a random few bytes, and
a plain JSONL file cut into pieces of random size must read as it reads whole.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import zlib
from unittest.mock import patch

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ray_crm.config import DataConfig
from ray_crm.data import readers
from ray_crm.data.blocks import parse_file
from ray_crm.data.pairs import REASONS, Issue
from ray_crm.data.readers import InputFile, iter_records, scan

FUZZ = settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
EACH = settings(FUZZ, max_examples=8)  # per kind of splice
CFG = DataConfig(columns={"keep": ["meta"]}, block_rows=16)
TEXT = st.text(max_size=12)
PAIRS = st.lists(st.fixed_dictionaries({"prompt": TEXT, "chosen": TEXT, "rejected": TEXT, "meta": TEXT}),
                 max_size=8)
# Spliced into a file at a random place; None: random bytes, b"": nothing.
JSONL_SPLICES = [
    None, b"",
    b"\n \t\r\n",  # a blank line is not a record
    b"\xff\xfe",  # not UTF-8
    b"\n" + b"[" * 5000 + b"\n",  # deeper than json.loads can go
    b'\n{"prompt": "q", "chosen": "a", "rejected": "b", "meta": ' + b"[" * 990 + b"]" * 990 + b"}\n",
    b'\n{"prompt": 1' + b"0" * 5000 + b"}\n",  # an integer beyond int(str)'s digit limit
    b'\n{"prompt": "' + b"x" * 200_000 + b'", "chosen": "a", "rejected": "b"}\n',
]
CSV_SPLICES = [None, b"", b"\xff\xfe", b"\x00", b"\r", b'"', b'\nq,"' + b"x" * 200_000 + b'",b,m\n']


def damage(data: bytes, draw, splice: bytes | None = None) -> bytes:
    """`data` with `splice` (None: random bytes) put in, then cut or overwritten, at random places (or not)."""
    if splice is None:
        splice = draw(st.binary(min_size=1, max_size=16))
    if splice:
        at = draw(st.integers(0, len(data)))
        data = data[:at] + splice + data[at:]
    at = draw(st.integers(0, len(data)))
    match draw(st.sampled_from(["none", "cut", "overwrite"])):
        case "cut":
            return data[:at]
        case "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=16))
            return data[:at] + chunk + data[at + len(chunk):]
    return data


def chunked(size: int):
    """Text read and decompressed `size` bytes at a time: lines and characters span chunks."""
    return patch.multiple(readers, CHUNK_BYTES=size, GZIP_STEP=size)


def read(data: bytes, name: str, fmt: str) -> tuple[int, list]:
    """The reader's count and rows; also through `parse_file`, whose tables must hold one row per record."""
    file = InputFile(name, fmt, None, 0)
    records = iter_records(io.BytesIO(data), file)
    rows = list(records)  # must not raise
    assert len(rows) == records.count
    for line, record, raw in rows:
        assert isinstance(line, int) and line >= 0
        assert isinstance(record, dict) or (isinstance(record, Issue) and record.reason in REASONS)
        assert raw is None or isinstance(raw, str)
    assert sum(t.num_rows for t in parse_file(io.BytesIO(data), file, CFG)) == records.count
    return records.count, rows


def gzipped(content: bytes, draw) -> tuple[bytes, bytes | None]:
    """`content` gzipped and maybe damaged, and what gzip itself can decompress from that (None: nothing)."""
    blob = damage(gzip.compress(content), draw)
    try:
        return blob, gzip.decompress(blob)
    except (OSError, EOFError, zlib.error):
        return blob, None


@pytest.mark.parametrize("splice", JSONL_SPLICES)
@EACH
@given(pairs=PAIRS, gz=st.booleans(), chunk=st.integers(1, 16), data=st.data())
def test_jsonl_never_raises_and_counts_non_blank_lines(splice, pairs, gz, chunk, data):
    raw = b"".join(json.dumps(p).encode() + b"\n" for p in pairs)
    content = damage(raw, data.draw, splice)
    if not gz:
        with chunked(chunk):
            count, rows = read(content, "d.jsonl", "jsonl")
        assert count == sum(1 for line in content.split(b"\n") if line.strip())
    else:
        blob, plain = gzipped(content, data.draw)
        with chunked(chunk):
            count, rows = read(blob, "d.jsonl.gz", "jsonl")
        if plain is None:
            assert rows[-1][1].reason == "bad_file"
        else:
            assert count == sum(1 for line in plain.split(b"\n") if line.strip())
        content = plain
    if content == raw:
        assert [r for _, r, _ in rows] == pairs


@pytest.mark.parametrize("splice", CSV_SPLICES)
@EACH
@given(pairs=PAIRS, gz=st.booleans(), chunk=st.integers(1, 16), data=st.data())
def test_csv_never_raises_and_counts_the_csv_modules_records(splice, pairs, gz, chunk, data):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["prompt", "chosen", "rejected", "meta"])
    writer.writerows([p["prompt"], p["chosen"], p["rejected"], p["meta"]] for p in pairs)
    raw = buf.getvalue().encode()
    content = damage(raw, data.draw, splice)
    if gz:
        blob, content = gzipped(content, data.draw)
        with chunked(chunk):
            count, rows = read(blob, "d.csv.gz", "csv")
        if content is None:
            assert rows[-1][1].reason == "bad_file"
            return
    else:
        with chunked(chunk):
            count, rows = read(content, "d.csv", "csv")
    expected = list(csv.reader(io.StringIO(content.decode("utf-8-sig", "surrogateescape"), newline="")))
    assert count == sum(1 for row in expected[1:] if row)
    if content == raw:
        assert [r for _, r, _ in rows] == [{k: p[k] for k in ("prompt", "chosen", "rejected", "meta")}
                                          for p in pairs]


@FUZZ
@given(PAIRS, st.integers(1, 4), st.sampled_from(["none", "snappy", "zstd"]), st.integers(1, 400), st.data())
def test_parquet_never_raises_and_counts_the_footers_rows(pairs, group_rows, compression, range_bytes, data):
    schema = pa.schema([(k, pa.string()) for k in ("prompt", "chosen", "rejected", "meta")])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(pairs, schema), buf, row_group_size=group_rows, compression=compression,
                   write_page_checksum=True)
    raw = buf.getvalue()
    footer = int.from_bytes(raw[-8:-4], "little") + 8
    blob = damage(raw, data.draw)
    count, rows = read(blob, "d.parquet", "parquet")
    if not blob.endswith(b"PAR1"):  # no footer
        assert [(line, r.reason) for line, r, _ in rows] == [(0, "bad_file")]
    elif blob[-footer:] == raw[-footer:]:  # the footer is intact: its row count holds, whatever the pages say
        assert count == len(pairs)
    if blob == raw:
        assert [r for _, r, _ in rows] == pairs
    file = InputFile("d.parquet", "parquet", None, 0)
    pieces = scan(io.BytesIO(blob), file, range_bytes).pieces  # runs of row groups read as the whole file
    assert [row for piece in pieces for row in iter_records(io.BytesIO(blob), file, piece)] == rows


@FUZZ
@given(PAIRS, st.integers(1, 4), st.data())
def test_arrow_stream_never_raises(pairs, batch_rows, data):
    table = pa.Table.from_pylist(pairs, pa.schema([(k, pa.string()) for k in ("prompt", "chosen", "rejected",
                                                                              "meta")]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=batch_rows)
    raw = sink.getvalue().to_pybytes()
    blob = damage(raw, data.draw)
    _, rows = read(blob, "d.arrow", "hf")
    if blob == raw:
        assert [r for _, r, _ in rows] == pairs


@pytest.mark.parametrize("splice", JSONL_SPLICES)
@EACH
@given(pairs=PAIRS, range_bytes=st.integers(1, 64), chunk=st.integers(1, 16), data=st.data())
def test_jsonl_pieces_read_as_the_whole_file(splice, pairs, range_bytes, chunk, data):
    content = damage(b"".join(json.dumps(p).encode() + b"\n" for p in pairs), data.draw, splice)
    count, whole = read(content, "d.jsonl", "jsonl")
    file = InputFile("d.jsonl", "jsonl", None, 0)
    with chunked(chunk):
        pieces = scan(io.BytesIO(content), file, range_bytes).pieces
        parts = [iter_records(io.BytesIO(content), file, piece) for piece in pieces]
        assert [row for part in parts for row in part] == whole
    assert sum(part.count for part in parts) == count
