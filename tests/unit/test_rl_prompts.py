"""RL prompts: files read with file/line-numbered errors, bad rows quarantined, the VADER prompts by default."""

from __future__ import annotations

import json

import pytest

from ray_crm.data.vader import PROMPTS
from ray_crm.rl.prompts import load_prompts


def test_default_prompts_are_the_vader_task_prompts(tmp_path):
    assert load_prompts([], "prompt", tmp_path / "q.jsonl") == list(PROMPTS.values())
    assert not (tmp_path / "q.jsonl").exists()


def test_bad_rows_are_quarantined_with_file_line_and_reason(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text('{"prompt": "first"}\n{"prompt": ""}\nnot json\n{"prompt": 3}\n{"other": "x"}\n{"prompt": "last"}\n')
    csv = tmp_path / "b.csv"
    csv.write_text("prompt,id\nfrom csv,1\n")
    quarantine = tmp_path / "out" / "quarantine.jsonl"
    assert load_prompts([str(jsonl), str(csv)], "prompt", quarantine) == ["first", "last", "from csv"]
    bad = [json.loads(line) for line in quarantine.read_text().splitlines()]
    assert [(b["line"], b["reason"]) for b in bad] == [(2, "empty"), (3, "malformed"), (4, "not_text"), (5, "missing")]
    assert all(b["file"] == str(jsonl) and b["field"] == "prompt" for b in bad)


def test_no_usable_prompt_fails_naming_the_first_problem(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"a.jsonl line 1 field 'prompt': missing"):
        load_prompts([str(path)], "prompt", tmp_path / "q.jsonl")
    assert (tmp_path / "q.jsonl").exists()
