"""Formats, column mapping and per-record validation: every bad record becomes an Issue with its line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_crm.config import ColumnsConfig, SplitConfig
from ray_crm.data.pairs import Issue, hash_split, pair_id, parse_split, to_pair
from ray_crm.data.readers import expand_inputs, iter_records

COLS = ColumnsConfig()


def records(path: Path) -> list:
    (file,) = expand_inputs([str(path)])
    return list(iter_records(path.read_bytes(), file))


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
    got = list(iter_records(Path(file.path).read_bytes(), file))
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
    import gzip

    path = tmp_path / "d.jsonl.gz"
    path.write_bytes(gzip.compress(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}).encode()))
    assert records(path)[0][1]["rejected"] == "b"
