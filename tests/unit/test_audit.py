"""The audit tells a planted spurious correlation from none."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ray_crm.data.audit import audit, format_table, write_audit
from ray_crm.data.binning import fit_binning


def run(zc, zr, continuous):
    binning = fit_binning({"z": np.concatenate([zc, zr])}, {"z": continuous}, {"z": 10}, 5)
    return audit({"z": zc}, {"z": zr}, binning.apply_each({"z": zc}), binning.apply_each({"z": zr}),
                 {"z": binning.sizes[0]}, {"z": continuous})


def test_planted_length_bias_is_flagged_and_none_is_not():
    rng = np.random.default_rng(0)
    a, b = rng.integers(5, 50, 3000), rng.integers(5, 50, 3000)
    biased = run(np.maximum(a, b), np.minimum(a, b), True)["z"]
    assert biased["signal"] in ("medium", "large") and biased["z_only_accuracy"] > 0.9
    fair = run(a, b, True)["z"]
    assert fair["signal"] == "none" and abs(fair["z_only_accuracy"] - 0.5) < 0.05


def test_sycophancy_shares_per_category(tmp_path):
    rng = np.random.default_rng(1)
    zc, zr = (rng.random(2000) < 0.8).astype(np.int64), (rng.random(2000) < 0.2).astype(np.int64)
    report = run(zc, zr, False)
    stats = report["z"]
    assert abs(stats["categories"]["1"]["chosen"] - 0.8) < 0.03 and abs(stats["categories"]["1"]["rejected"] - 0.2) < 0.03
    assert stats["signal"] == "large"
    assert "79.7% of chosen vs 21.6% of rejected" in format_table(report)
    paths = write_audit(report, {"z": zc}, {"z": zr}, tmp_path)
    assert json.loads(Path(paths["json"]).read_text())["z"]["pairs"] == 2000
    assert Path(paths["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
