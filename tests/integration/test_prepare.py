"""`ray-crm prepare` on real Ray: a malformed multi-format input, the bad-fraction gate, an unreadable file, and
VADER pairs.

The malformed input holds one row of every kind of problem, and its JSONL and Parquet files are read in many
pieces; the test checks that the quarantine holds each of them with its reason, file and true line, that every
good row arrives in exactly one split, and that the bins fitted on train reproduce the stored bin ids when
re-applied to the test split. Failed runs must leave the previous output as it was.
"""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_crm.config import validate
from ray_crm.data import pipeline
from ray_crm.data.binning import Binning, fit_binning
from ray_crm.data.pairs import pair_id
from ray_crm.data.pipeline import PrepareError, load_manifest, read_prepared, read_prepared_table, run_prepare
from ray_crm.data.sampler import StratifiedBatchSampler
from ray_crm.data.zbins import ResponseBinner
from tests.tiny_models import WORDS

pytestmark = pytest.mark.integration
TOPICS = ["food", "service", "price"]


def sentence(rng: random.Random, lo: int = 3, hi: int = 14) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + "."


def good_rows(n: int, seed: int, splits=("train",) * 6 + ("validation", "test")) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": sentence(rng, 2, 5), "chosen": sentence(rng), "rejected": sentence(rng),
             "topic": rng.choice(TOPICS), "split": rng.choice(splits)} for _ in range(n)]


def write_messy_inputs(root: Path) -> tuple[list[dict], set[tuple[str, int, str]]]:
    """JSONL, gzipped JSONL, CSV and Parquet inputs; returns the good rows and the (file, line, reason) of every
    bad row."""
    good, bad = [], set()
    lines: list[bytes] = []

    def add(row: dict | bytes, reason: str | None = None) -> None:
        lines.append(row if isinstance(row, bytes) else json.dumps(row).encode())
        if reason:
            bad.add(("messy.jsonl", len(lines), reason))
        elif isinstance(row, dict):
            good.append(row)

    jsonl_good = good_rows(60, seed=1)
    first = jsonl_good[0]
    for row in jsonl_good:
        add(row)
    add(b"")  # a blank line is not a record
    add(b"{not json", "malformed")
    add(b"[1, 2]", "malformed")
    add(b'{"prompt": "q", "chosen": "\xff\xfe", "rejected": "b", "split": "train", "topic": "food"}', "undecodable")
    add({**first, "rejected": None, "chosen": "other"}, "missing_field")
    add({k: v for k, v in first.items() if k != "rejected"}, "missing_field")
    add({**first, "chosen": 42}, "not_a_string")
    add({**first, "chosen": "   "}, "empty_field")
    add({**first, "rejected": first["chosen"]}, "identical")
    add(dict(first), "duplicate")
    add({**first, "chosen": "the movie was great.", "topic": None}, "bad_z")
    add({**first, "chosen": "the film " * 80}, "overlong")
    add({**first, "chosen": "a new one.", "split": "holdout"}, "bad_split")
    (root / "messy.jsonl").write_bytes(b"\n".join(lines) + b"\n")

    csv_good = good_rows(20, seed=2)
    text = "prompt,chosen,rejected,topic,split\n" + "".join(
        f'{r["prompt"]},"{r["chosen"]}",{r["rejected"]},{r["topic"]},{r["split"]}\n' for r in csv_good)
    (root / "part.csv").write_bytes(text.encode() + b"q,a,b\n" + b"q,\xff,b,food,train\n")
    good += csv_good
    n_csv = 1 + len(csv_good)
    bad |= {("part.csv", n_csv + 1, "malformed"), ("part.csv", n_csv + 2, "undecodable")}

    pq_good = good_rows(20, seed=3)
    pq.write_table(pa.Table.from_pylist(pq_good), root / "part.parquet", row_group_size=5)
    good += pq_good

    gz_good = good_rows(10, seed=5)
    (root / "part.jsonl.gz").write_bytes(gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in gz_good)))
    good += gz_good
    return good, bad


def messy_config(root: Path, tiny_bert_dir: Path, **data) -> dict:
    return {
        "name": "messy",
        "output_dir": str(root / "out"),
        "model": {"name": str(tiny_bert_dir), "max_length": 64},
        "data": {
            "paths": [str(root / "messy.jsonl"), str(root / "part.csv"), str(root / "part.parquet"),
                      str(root / "part.jsonl.gz")],
            "columns": {"split": "split", "keep": ["topic"]},
            "validation": {"max_bad_fraction": 0.5, "on_overlong": "quarantine"},
            "spurious": [{"name": "length", "kind": "length", "unit": "tokens", "bins": 3},
                         {"name": "topic", "kind": "concept", "column": "topic"}],
            "binning": {"min_count": 2},
            "block_rows": 16,
            **data,
        },
    }


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tiny_bert_dir, ray_local):
    root = tmp_path_factory.mktemp("messy")
    good, bad = write_messy_inputs(root)
    cfg = validate(messy_config(root, tiny_bert_dir))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "RANGE_BYTES", 1024)  # bad rows and the first of a duplicate in different pieces
        result = run_prepare(cfg)
    return good, bad, result, cfg


def test_quarantine_holds_every_bad_row_with_reason_file_and_line(messy):
    _, bad, result, _ = messy
    rows = [json.loads(line) for line in (Path(result["output_dir"]) / "quarantine.jsonl").read_text().splitlines()]
    got = {(Path(r["source_file"]).name, r["source_line"], r["reason"]) for r in rows}
    assert got == bad and result["quarantined"] == len(bad)
    assert all(r["detail"] for r in rows)
    by_reason = {r["reason"]: r for r in rows}
    assert by_reason["not_a_string"]["field"] == "chosen" and "int" in by_reason["not_a_string"]["detail"]
    assert by_reason["duplicate"]["detail"].endswith("messy.jsonl:1")
    assert by_reason["bad_z"]["field"] == "topic"
    assert by_reason["malformed"]["raw"]


def test_every_good_row_arrives_once_in_its_split(messy):
    good, _, result, _ = messy
    out = Path(result["output_dir"])
    arrived = {}
    for split in ("train", "validation", "test"):
        table = read_prepared_table(out, split)
        assert "split" not in table.column_names  # the folder is the split
        for pid in table["pair_id"].to_pylist():
            assert pid not in arrived
            arrived[pid] = split
    assert arrived == {pair_id(r["prompt"], r["chosen"], r["rejected"]): r["split"] for r in good}
    assert read_prepared(out, "train").count() == result["pairs"]["train"]


def test_output_contract_and_manifest(messy):
    good, bad, result, _ = messy
    out = Path(result["output_dir"])
    table = read_prepared_table(out, "train")
    for name in ("pair_id", "prompt", "chosen", "rejected", "chosen_input_ids", "rejected_input_ids",
                 "chosen_token_type_ids", "rejected_token_type_ids", "z_length_chosen", "z_length_rejected",
                 "z_topic_chosen", "z_topic_rejected", "bin_chosen", "bin_rejected", "stratum", "topic",
                 "source_file", "source_line", "truncated"):
        assert name in table.column_names, name
    assert table.schema.field("chosen_input_ids").type == pa.list_(pa.int32())
    assert table.schema.field("bin_chosen").type == pa.int64() == table.schema.field("stratum").type
    manifest = load_manifest(out)
    for side in ("chosen", "rejected"):
        ids = table[f"bin_{side}"].to_numpy()
        assert ids.min() >= 0 and ids.max() < manifest["num_bins"]
    assert max(len(x) for x in table["chosen_input_ids"].to_pylist()) <= 64
    assert manifest["num_bins"] == Binning.from_dict(manifest["binning"]).num_bins
    assert manifest["rows"] == {"records_read": len(good) + len(bad), "kept": len(good), "quarantined": len(bad)}
    assert manifest["quarantine"]["count"] == len(bad)
    assert sum(manifest["splits"]["train"]["bins_chosen"]) == manifest["splits"]["train"]["pairs"] == table.num_rows
    assert {i["path"].rsplit("/", 1)[1] for i in manifest["inputs"]} == {"messy.jsonl", "part.csv", "part.parquet",
                                                                         "part.jsonl.gz"}
    assert all(len(i["sha256"]) == 64 for i in manifest["inputs"])
    pieces = {i["path"].rsplit("/", 1)[1]: i["pieces"] for i in manifest["inputs"]}
    assert pieces["messy.jsonl"] > 5 and pieces["part.parquet"] > 1
    assert pieces["part.csv"] == pieces["part.jsonl.gz"] == 1  # read whole, streamed
    assert manifest["tokenizer"]["mode"] == "text_pair" and manifest["versions"]["ray"]
    assert set(json.loads((out / "audit.json").read_text())) == {"length", "topic"}
    assert (out / "audit.png").stat().st_size > 0


def test_bins_fitted_on_train_are_identical_when_applied_to_test(messy):
    _, _, result, cfg = messy
    out = Path(result["output_dir"])
    manifest = load_manifest(out)
    binning = Binning.from_dict(manifest["binning"])
    train, test = read_prepared_table(out, "train"), read_prepared_table(out, "test")
    zs = lambda t, side: {n: t[f"z_{n}_{side}"].to_numpy(zero_copy_only=False) for n in binning.names}
    refit = fit_binning({n: np.concatenate([zs(train, "chosen")[n], zs(train, "rejected")[n]]) for n in binning.names},
                        {"length": True, "topic": False}, {"length": 3, "topic": 10}, cfg.data.binning.min_count)
    assert refit == binning  # the manifest's bins are exactly those of the train split
    for side in ("chosen", "rejected"):
        assert np.array_equal(binning.apply(zs(test, side)), test[f"bin_{side}"].to_numpy())
    # a later consumer (PPO rollouts) re-measures Z from raw text and gets the same bins
    binner = ResponseBinner.from_manifest(manifest)
    columns = {"topic": test["topic"].to_pylist()}
    assert np.array_equal(binner.bins(test["prompt"].to_pylist(), test["chosen"].to_pylist(), columns),
                          test["bin_chosen"].to_numpy())


def test_the_sampler_runs_on_the_prepared_strata(messy):
    _, _, result, _ = messy
    strata = read_prepared_table(Path(result["output_dir"]), "train", ["stratum"])["stratum"].to_numpy()
    batches = list(StratifiedBatchSampler(strata, 8, seed=0).batches(0))
    assert batches and all(len(b) == 8 for b in batches)


def test_too_many_bad_rows_fail_with_file_line_and_field(tmp_path, tiny_bert_dir, ray_local):
    write_messy_inputs(tmp_path)
    cfg = validate(messy_config(tmp_path, tiny_bert_dir, validation={"max_bad_fraction": 0.05}))
    with pytest.raises(PrepareError) as err:
        run_prepare(cfg)
    message = str(err.value)
    assert "max_bad_fraction=0.05" in message and "messy.jsonl:" in message
    quarantine = tmp_path / "out" / "messy" / ".prepare.tmp" / "quarantine.jsonl"  # the failed run's folder
    assert str(quarantine) in message and quarantine.stat().st_size > 0
    assert not (tmp_path / "out" / "messy" / "prepare").exists()  # nothing half-written where trainers read


def test_an_unreadable_file_stops_prepare_and_the_previous_output_stays(messy, tmp_path):
    _, _, result, cfg = messy
    out = Path(result["output_dir"])
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    whole = gzip.compress(b"".join(json.dumps(r).encode() + b"\n" for r in good_rows(400, seed=4)))
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    broken = cfg.model_dump(mode="json")
    broken["data"]["paths"].append(str(tmp_path / "cut.jsonl.gz"))
    with pytest.raises(PrepareError, match=r"1 input file\(s\) cannot be read.*cut\.jsonl\.gz:\d+: the gzip stream"):
        run_prepare(validate(broken))
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_cli_prepare_on_vader_pairs(tmp_path, tiny_bert_dir, ray_local, capsys):
    from ray_crm.assets import AssetError, asset_dir
    from ray_crm.cli import main

    try:
        asset_dir("vader")
    except AssetError:
        pytest.skip("the VADER asset is not fetched (ray-crm assets --only vader)")
    config = Path(__file__).parents[2] / "configs" / "prepare_vader.yaml"
    assert main(["prepare", "--config", str(config), f"model.name={tiny_bert_dir}", "data.vader.num_pairs=3000",
                 f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{\n"):])  # the stage's JSON summary, after the audit table
    assert result["quarantined"] == 0 and result["audit"]["length"] != "none"
    manifest = load_manifest(tmp_path / "vader_length" / "prepare")
    assert sum(s["pairs"] for s in manifest["splits"].values()) == 3000 and manifest["quarantine"]["count"] == 0
    assert manifest["num_bins"] >= 5
    assert json.loads((tmp_path / "vader_length" / "prepare" / "audit.json").read_text())["length"]["signal"] != "none"
