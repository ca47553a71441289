"""Formats, column mapping and per-record validation: every bad record becomes an Issue with its line, every
reader counts what a file holds, and a file read in pieces gives what it gives read whole (random damage is
fuzzed in test_reader_fuzz.py)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
from itertools import pairwise
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_crm.config import ColumnsConfig, DataConfig, SplitConfig
from ray_crm.data import blocks, readers
from ray_crm.data.pairs import Issue, as_text, hash_split, pair_id, parse_split, to_pair
from ray_crm.data.readers import WHOLE, InputFile, Piece, expand_inputs, iter_records, scan

COLS = ColumnsConfig()
PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


def records(path: Path, piece: Piece = WHOLE) -> list:
    """The records of a file (or a piece of it), checked to be as many as its reader counted."""
    (file,) = expand_inputs([str(path)])
    with path.open("rb") as source:
        got = iter_records(source, file, piece)
        out = list(got)
    assert len(out) == got.count
    return out


def pieces(path: Path, range_bytes: int) -> tuple:
    (file,) = expand_inputs([str(path)])
    with path.open("rb") as source:
        return scan(source, file, range_bytes).pieces


def reasons(got: list) -> list:
    return [(line, r.reason if isinstance(r, Issue) else "ok") for line, r, _ in got]


def test_plain_pairs_and_field_checks():
    assert to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, COLS) == ("q", "a", "b")
    cases = [
        ({"prompt": "q", "chosen": "a"}, "missing_field", "rejected"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, "missing_field", "chosen"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "not_a_string", "chosen"),
        ({"prompt": " ", "chosen": "a", "rejected": "b"}, "empty_field", "prompt"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "identical", None),
        ({"prompt": "q", "chosen": "bad \udc80", "rejected": "b"}, "undecodable", "chosen"),
        ({"prompt": "q", "chosen": b"\xff", "rejected": "b"}, "undecodable", "chosen"),
    ]
    for record, reason, field in cases:
        issue = to_pair(record, COLS)
        assert isinstance(issue, Issue) and (issue.reason, issue.field) == (reason, field), record


def test_column_mapping():
    cols = ColumnsConfig(prompt="question", chosen="good", rejected="bad")
    assert to_pair({"question": "q", "good": "a", "bad": "b"}, cols) == ("q", "a", "b")


def test_hh_rlhf_shared_prefix_is_the_prompt():
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant: Go away."
    prompt, c, r = to_pair({"chosen": chosen, "rejected": rejected}, COLS)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: How are you?\n\nAssistant:"
    assert (c, r) == ("Fine, thanks.", "Go away.")
    issue = to_pair({"chosen": "no markers", "rejected": "at all"}, COLS)
    assert issue.reason == "bad_format"


def test_chat_message_lists_implicit_and_explicit_prompt():
    user = {"role": "user", "content": "What is 2+2?"}
    chosen = [user, {"role": "assistant", "content": "4"}]
    rejected = [user, {"role": "assistant", "content": "5"}]
    assert to_pair({"chosen": chosen, "rejected": rejected}, COLS) == ("What is 2+2?", "4", "5")
    explicit = {"prompt": [user], "chosen": chosen[1:], "rejected": rejected[1:]}
    assert to_pair(explicit, COLS) == ("What is 2+2?", "4", "5")
    assert to_pair({"prompt": "What is 2+2?", "chosen": chosen, "rejected": rejected}, COLS) == (
        "What is 2+2?", "4", "5")
    differ = {"chosen": chosen, "rejected": [{"role": "user", "content": "other"}, rejected[1]]}
    assert to_pair(differ, COLS).reason == "bad_format"
    no_role = {"chosen": [user, {"content": "4"}], "rejected": rejected}
    assert to_pair(no_role, COLS).field == "chosen[1].role"


def test_pair_id_and_hash_split_are_deterministic():
    assert pair_id("q", "a", "b") == pair_id("q", "a", "b") != pair_id("q", "b", "a")
    cfg = SplitConfig(validation=0.2, test=0.3, seed=1)
    splits = [hash_split(f"prompt {i}", cfg) for i in range(5000)]
    assert splits == [hash_split(f"prompt {i}", cfg) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.3) < 0.03 and abs(splits.count("validation") / 5000 - 0.2) < 0.03
    assert parse_split("Valid", "s") == "validation" and parse_split("holdout", "s").reason == "bad_split"


def test_jsonl_lines_numbered_and_bad_lines_reported(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"prompt": "q", "chosen": "a", "rejected": "b"}\n\n{not json}\n[1, 2]\n'
                     b'{"prompt": "q", "chosen": "\xff\xfe", "rejected": "b"}\n')
    got = records(path)
    assert [line for line, _, _ in got] == [1, 3, 4, 5]
    assert got[0][1]["chosen"] == "a"
    assert [r.reason for _, r, _ in got[1:]] == ["malformed", "malformed", "undecodable"]
    assert "\\xff" in got[3][2]  # the raw line is kept, readable


def test_csv_line_numbers_follow_multiline_fields(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(b'prompt,chosen,rejected\nq,"two\nlines",b\nq,only two\nq,"a",\xff\n')
    got = records(path)
    assert [line for line, _, _ in got] == [2, 4, 5]
    assert got[0][1]["chosen"] == "two\nlines"
    assert got[1][1].reason == "malformed"
    assert to_pair(got[2][1], COLS).reason == "undecodable"


def test_parquet_rows_and_non_string_columns(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["q", "q"], "chosen": ["a", "c"], "rejected": ["b", "d"], "n": [1, 2]}), path)
    got = records(path)
    assert [(line, to_pair(r, COLS)) for line, r, _ in got] == [(1, ("q", "a", "b")), (2, ("q", "c", "d"))]
    cols = ColumnsConfig(chosen="n")
    assert to_pair(got[0][1], cols).reason == "not_a_string"


def test_saved_hf_dataset_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"prompt": ["q"] * 3, "chosen": ["a", "b", "c"], "rejected": ["x", "y", "z"]})
    ds.save_to_disk(tmp_path / "hf")
    (file,) = expand_inputs([str(tmp_path / "hf")])
    assert file.format == "hf"
    with open(file.path, "rb") as source:
        got = list(iter_records(source, file))
    assert [to_pair(r, COLS)[1] for _, r, _ in got] == ["a", "b", "c"]
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "dd")
    with pytest.raises(ValueError, match="name one split folder"):
        expand_inputs([str(tmp_path / "dd")])


def test_expand_inputs_globs_folders_splits_and_errors(tmp_path):
    for name in ("a.jsonl", "b.jsonl.gz", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [f.path.rsplit("/", 1)[1] for f in expand_inputs([str(tmp_path)])] == ["a.jsonl", "b.jsonl.gz"]
    files = expand_inputs({"train": [str(tmp_path / "a.*")], "test": [str(tmp_path / "b.jsonl.gz")]})
    assert [(f.split, f.index) for f in files] == [("train", 0), ("test", 1)]
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        expand_inputs([str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="unknown file type"):
        expand_inputs([str(tmp_path / "notes.txt")])
    with pytest.raises(ValueError, match="listed twice"):
        expand_inputs([str(tmp_path / "a.jsonl"), str(tmp_path / "a.jsonl")])


def test_gzip_jsonl(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps(PAIR).encode()))
    assert records(path)[0][1]["rejected"] == "b"


def test_a_cut_gzip_keeps_the_records_before_the_cut_and_reports_the_cut(tmp_path):
    lines = b"".join(json.dumps({**PAIR, "prompt": "x" * 40 + str(i)}).encode() + b"\n" for i in range(2000))
    whole = gzip.compress(lines)
    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    got = records(path)
    *kept, (cut_line, cut, raw) = got
    assert kept and all(isinstance(r, dict) for _, r, _ in kept) and len(kept) < 2000
    assert [line for line, _, _ in kept] == list(range(1, len(kept) + 1))
    assert (cut_line, cut.reason) == (len(kept) + 1, "bad_file") and "gzip stream breaks off" in cut.detail
    assert lines.decode().splitlines()[len(kept)].startswith(raw)  # the partial line is the cut's raw text
    path.write_bytes(lines)  # not gzip at all
    assert reasons(records(path)) == [(1, "bad_file")]


def test_deep_nesting_and_huge_integers_are_malformed_records(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"[" * 100_000 + b"\n" + b'{"prompt": 1' + b"0" * 5000 + b"}\n" + json.dumps(PAIR).encode())
    got = records(path)
    assert reasons(got) == [(1, "malformed"), (2, "malformed"), (3, "ok")]
    assert "nested too deeply" in got[0][1].detail and "digits" in got[1][1].detail
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert as_text(deep, "meta") == Issue("malformed", "meta", "field 'meta' is nested too deeply to copy")


def test_a_csv_field_over_128_kib_is_read(tmp_path):
    path = tmp_path / "d.csv"
    long = "word " * 60_000
    path.write_bytes(f'prompt,chosen,rejected\nq,"{long}",b\nq,a,b\n'.encode())
    got = records(path)
    assert reasons(got) == [(2, "ok"), (3, "ok")] and got[0][1]["chosen"] == long


def write_parquet(path: Path, table: pa.Table, **kwargs) -> bytes:
    pq.write_table(table, path, **kwargs)
    return path.read_bytes()


def test_a_damaged_parquet_page_quarantines_the_rows_of_its_row_group_only(tmp_path):
    path = tmp_path / "d.parquet"
    table = pa.table({"prompt": [f"q{i}" for i in range(6)], "chosen": ["a"] * 6, "rejected": ["b"] * 6})
    data = bytearray(write_parquet(path, table, row_group_size=2, compression="none", write_page_checksum=True))
    meta = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = meta.data_page_offset + 20  # inside row group 1's first data page, past its header
    data[start: start + 4] = b"\xde\xad\xbe\xef"
    path.write_bytes(bytes(data))
    got = records(path)
    assert reasons(got) == [(1, "ok"), (2, "ok"), (3, "unreadable"), (4, "unreadable"), (5, "ok"), (6, "ok")]
    assert "row group 1" in got[2][1].detail
    path.write_bytes(bytes(data[:-10]))  # no footer: the file cannot be read, nor its rows counted
    got = records(path)
    assert reasons(got) == [(0, "bad_file")] and "not a readable Parquet file" in got[0][1].detail


def test_a_parquet_footer_whose_row_counts_disagree_is_a_bad_file(tmp_path):
    path = tmp_path / "d.parquet"
    data = write_parquet(path, pa.table({"prompt": [f"q{i}" for i in range(6)]}), row_group_size=2)
    start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    for at in range(start, len(data) - 8):  # the first footer byte whose change makes a row count negative
        path.write_bytes(data[:at] + b"\x7f" + data[at + 1:])
        try:
            meta = pq.ParquetFile(path).metadata
        except (OSError, ValueError):
            continue
        if any(meta.row_group(g).num_rows < 0 for g in range(meta.num_row_groups)):
            break
    else:
        pytest.fail("no footer byte makes a row count negative")
    got = records(path)
    assert reasons(got) == [(0, "bad_file")] and "row counts disagree" in got[0][1].detail


def test_a_parquet_value_python_cannot_hold_quarantines_its_row(tmp_path):
    path = tmp_path / "d.parquet"
    write_parquet(path, pa.table({"prompt": ["q", "r"], "when": pa.array([0, 2**30], pa.date32())}))
    got = records(path)
    assert reasons(got) == [(1, "ok"), (2, "unreadable")] and got[0][1]["prompt"] == "q"


def test_a_cut_arrow_stream_keeps_the_batches_before_the_cut(tmp_path):
    sink = pa.BufferOutputStream()
    table = pa.table({"prompt": [f"q{i}" for i in range(6)], "chosen": ["a"] * 6, "rejected": ["b"] * 6})
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    data = sink.getvalue().to_pybytes()
    file = InputFile("d.arrow", "hf", None, 0)
    got = iter_records(io.BytesIO(data[: len(data) - 200]), file)
    assert reasons(list(got)) == [(1, "ok"), (2, "ok"), (3, "ok"), (4, "ok"), (5, "bad_file")] and got.count == 5


def test_parse_file_fails_naming_the_counts_if_a_reader_loses_a_record(monkeypatch):
    class Lossy(list):
        count = 2

    monkeypatch.setattr(blocks, "iter_records", lambda source, file, piece: Lossy([(1, dict(PAIR), None)]))
    with pytest.raises(RuntimeError, match="d.jsonl: the reader counted 2 records but gave 1"):
        list(blocks.parse_file(io.BytesIO(), InputFile("d.jsonl", "jsonl", None, 0), DataConfig()))


@pytest.mark.parametrize("chunk", [3, 1 << 20])
@pytest.mark.parametrize("range_bytes", [1, 40, 150])
def test_jsonl_pieces_keep_the_true_line_numbers(tmp_path, monkeypatch, chunk, range_bytes):
    monkeypatch.setattr(readers, "CHUNK_BYTES", chunk)  # also lines that span chunks
    good = [json.dumps({**PAIR, "prompt": f"q{i}"}).encode() for i in range(8)]
    lines = [good[0], b"", good[1] + b"\r", b"  ", good[2], good[3], good[4], b"{bad json", b"\r", good[5], b"",
             good[6] + b"\r", good[7]]  # blank lines, CRLF, and no newline after the last record
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines))
    whole = records(path)
    cut = pieces(path, range_bytes)
    assert len(cut) > 2 and cut[0].start == 0 and cut[-1].stop is None
    data = path.read_bytes()
    for before, after in pairwise(cut):
        assert before.stop == after.start and data[after.start - 1: after.start] == b"\n"
        assert after.first == data[: after.start].count(b"\n") + 1
    assert [row for piece in cut for row in records(path, piece)] == whole
    assert reasons(whole) == [(1, "ok"), (3, "ok"), (5, "ok"), (6, "ok"), (7, "ok"), (8, "malformed"), (10, "ok"),
                              (12, "ok"), (13, "ok")]
    assert next(p for p in cut if p.start <= data.index(b"{bad") < (p.stop or len(data))) != cut[0]


def test_a_file_ending_in_a_newline_has_no_empty_last_piece(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"".join(json.dumps(PAIR).encode() + b"\n" for _ in range(4)))
    cut = pieces(path, 1)
    assert [(p.start, p.first) for p in cut] == [(i * len(json.dumps(PAIR)) + i, i + 1) for i in range(4)]
    (tmp_path / "e.jsonl").write_bytes(b"")
    assert pieces(tmp_path / "e.jsonl", 1) == (WHOLE,) and records(tmp_path / "e.jsonl") == []


def test_scan_hashes_every_format_and_cuts_only_plain_jsonl_and_parquet(tmp_path):
    text = "".join(json.dumps(PAIR) + "\n" for _ in range(50)).encode()
    files = {"d.jsonl.gz": gzip.compress(text), "d.csv": b"prompt,chosen,rejected\n" + b"q,a,b\n" * 50}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        (file,) = expand_inputs([str(tmp_path / name)])
        with (tmp_path / name).open("rb") as source:
            got = scan(source, file, 1)
        assert got.pieces == (WHOLE,) and got.size == len(data) and got.sha256 == hashlib.sha256(data).hexdigest()


def test_parquet_pieces_are_runs_of_row_groups(tmp_path):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i}" for i in range(5)], "chosen": ["a"] * 5, "rejected": ["b"] * 5}),
                   path, row_group_size=2)
    assert pieces(path, 1) == (Piece(0, 1, 1), Piece(1, 2, 3), Piece(2, 3, 5))
    assert pieces(path, 1 << 20) == (Piece(0, 3, 1),)
    whole = records(path)
    assert [row for piece in pieces(path, 1) for row in records(path, piece)] == whole
    assert [line for line, _, _ in whole] == [1, 2, 3, 4, 5]
    path.write_bytes(path.read_bytes()[:-10])  # an unreadable footer: one piece, which its task reports
    assert pieces(path, 1) == (WHOLE,) and reasons(records(path)) == [(0, "bad_file")]
