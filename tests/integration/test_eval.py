"""`ray-crm eval` and `ray-crm audit` end to end on a tiny reward-model folder and small real-text benchmarks."""

import json
from pathlib import Path

import pandas as pd
import pytest

from ray_crm.cli import main
from ray_crm.config import load_config
from ray_crm.eval.report import models

pytestmark = pytest.mark.integration

SMALL = ["bench.train_pairs=20", "bench.validation_pairs=10", "bench.test_items=24", "bench.demographic_items=3",
         "eval.batch_size=32"]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


def _png(path) -> bool:
    return Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_writes_a_report_for_every_model_and_benchmark(tmp_path, bench_dir, tiny_bert_dir, capsys):
    code = main(["eval", "--model", f"vanilla={tiny_bert_dir}", "--model", f"crm={tiny_bert_dir}",
                 f"output_dir={tmp_path}", f"bench.dir={bench_dir}", *SMALL])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads(Path(printed["report"]).read_text())
    assert set(report["results"]) == {"vanilla", "crm"}
    for bench in ("sycophancy", "concept", "length", "demographic"):
        summary = report["results"]["vanilla"][bench]
        assert 0.0 <= summary["accuracy"] <= 100.0 and summary["ci_gap"] >= 0.0
        scores = pd.read_parquet(tmp_path / "run" / "eval" / "scores" / "crm" / f"{bench}.parquet")
        assert scores.reward.notna().all()
    assert "## demographic" in Path(printed["markdown"]).read_text()
    assert {p.rsplit("/", 1)[1] for p in printed["plots"]} == {"bias_bars.png", "accuracy_vs_bias.png",
                                                                 "reward_vs_length.png"}
    assert all(_png(p) for p in printed["plots"])


def test_audit_gives_a_verdict_per_spurious_variable(tmp_path, bench_dir, tiny_bert_dir, capsys):
    code = main(["audit", "--model", str(tiny_bert_dir), "--bench", "sycophancy,length",
                 f"output_dir={tmp_path}", f"bench.dir={bench_dir}", *SMALL])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    (verdicts,) = printed["verdicts"].values()
    assert set(verdicts) == {"sycophancy", "length"}
    assert set(verdicts.values()) <= {"low", "moderate", "high", "n/a"}
    card = json.loads(Path(printed["report"]).read_text())["cards"][tiny_bert_dir.name]
    assert {"prefix_shift_std", "sycophancy_rate", "ci_gap_std"} <= set(card["sycophancy"])
    assert _png(printed["plots"][0])


def test_without_a_model_eval_names_the_missing_export(tmp_path):
    cfg = load_config(None, [f"output_dir={tmp_path}"])
    with pytest.raises(FileNotFoundError, match="export"):
        models(cfg)
