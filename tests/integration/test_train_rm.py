"""Reward-model training for real: Ray Train workers running DeepSpeed ZeRO-2/3 with LoRA on a tiny BERT."""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ray_crm.config import load_config, run_name
from ray_crm.data.pipeline import read_prepared_table, run_prepare
from ray_crm.train.rm_trainer import VAL_SCORES, run_train_rm

GOOD = ["great", "wonderful", "best", "love", "fun"]
BAD = ["awful", "terrible", "worst", "boring", "bad"]
FILLER = ["the", "movie", "film", "story", "plot", "actor", "and", "it", "was"]


def _pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen responses carry positive words, rejected negative ones; lengths vary independently."""
    rng = random.Random(seed)
    sentence = lambda words: " ".join(rng.choice(FILLER + words) for _ in range(rng.randint(3, 20)))
    return [{"prompt": f"review {i}", "chosen": sentence(GOOD) + " great", "rejected": sentence(BAD) + " awful"}
            for i in range(n)]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir, ray_local):
    root = tmp_path_factory.mktemp("rm")
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in _pairs(400)))
    overrides = [
        f"output_dir={root}", "name=tiny", f"data.paths=[{src}]", f"data.output_dir={root / 'prepared'}", f"model.name={tiny_bert_dir}", "model.max_length=48",
        "model.lora.rank=8", "model.lora.alpha=16", "data.split.validation=0.15", "data.split.test=0.05",
        "data.split.by=pair", "data.spurious=[{name: length, kind: length, unit: words, bins: 3}]",
        "data.binning.min_count=5",
    ]
    run_prepare(load_config(None, overrides))
    return overrides


def _cfg(prepared, *extra):
    base = ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=16", "train.lr=0.005"]
    return load_config(None, [*prepared, *base, *extra])


def _eval_log(cfg) -> pd.DataFrame:
    return pd.read_csv(cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "eval.csv")


def test_zero2_crm_on_mirror_resampled_packed_pairs_with_a_ramped_penalty_trains_and_lowers_the_loss(prepared):
    cfg = _cfg(prepared, "train.zero_stage=2", "train.pack_tokens=96", "loss.type=crm", "loss.lambda_mmd=0.5",
               "loss.balance=mirror_sample",
               "loss.lambda_warmup=0.2", "train.epochs=2", "train.max_steps=30", "train.eval_every=5", "train.lr=0.01")
    result = run_train_rm(cfg)
    evals = _eval_log(cfg)
    assert evals["val_bt_loss"].iloc[-1] < evals["val_bt_loss"].iloc[0] - 0.05
    assert result["val_accuracy"] > 0.7 and result["step"] > 0
    train = pd.read_csv(cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "train.csv")
    assert train["step"].tolist() == list(range(1, 31))
    assert (train["mmd/penalty"] >= 0).all() and train["mmd/penalty"].max() > 0
    # the penalty's weight ramps over the first 20% of the 30 steps (6), logged at each step as used
    assert train["lambda"].tolist() == pytest.approx([0.5 * s / 6 for s in range(6)] + [0.5] * 24)


def test_zero3_conditional_z_kernel_mirror_weighted_packed_export_scores_as_the_trainer_did(prepared, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    cfg = _cfg(prepared, "train.zero_stage=3", "train.pack_tokens=96", "loss.type=crm", "loss.variant=conditional",
               "loss.lambda_mmd=0.5", "train.max_steps=8", "loss.balance=mirror", "loss.mmd.z_kernel=rbf")
    result = run_train_rm(cfg)
    # the penalty compared the rewards with Z's measured values (HSIC), over the global batch of both workers
    train = pd.read_csv(cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "train.csv")
    assert (train["mmd/chosen/hsic"] > 0).all() and (train["mmd/rejected/z_bandwidth"] > 0).all()
    assert "mmd/chosen/pairs" not in train
    merged = Path(result["model"])
    export = merged.parent
    assert (export / "adapter" / "adapter_config.json").exists() and export.parent.name.endswith(
        f"-mirror-{run_name(cfg).rsplit('-', 1)[1]}")
    card = json.loads((export / "model_card.json").read_text())
    assert card["config"]["loss"]["variant"] == "conditional" and card["config"]["loss"]["balance"] == "mirror"
    # the export's reward is calibrated on the validation pairs: never a worse held-out BT loss than as trained
    cal = card["reward_calibration"]
    assert cal["scale"] > 0 and cal["val_bt_loss_calibrated"] <= cal["val_bt_loss"] + 1e-9

    model = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    tok = AutoTokenizer.from_pretrained(merged)
    trained = np.load(export / VAL_SCORES)
    val = read_prepared_table(cfg.prepared_dir(), "validation").to_pandas().set_index("pair_id")
    rows = val.loc[trained["pair_id"][:16]]
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            enc = tok(list(rows["prompt"]), list(rows[side]), padding=True, truncation=True, max_length=48,
                      return_tensors="pt")
            ours = model(**enc).logits.squeeze(-1).numpy()
            np.testing.assert_allclose(ours, trained[side][:16], atol=1e-5, rtol=1e-5)  # fp32: rewards of ~16 differ in the 7th digit


def test_a_worker_killed_after_a_checkpoint_resumes_from_it(prepared, ray_local):
    from ray.util.state import list_actors

    cfg = _cfg(prepared, "train.zero_stage=2", "train.epochs=3", "train.max_steps=20", "train.checkpoint_every=5",
               "train.max_failures=2", "name=killed")
    steps_log = cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "train.csv"

    def logged_steps() -> int:  # a step logged after step 5 means checkpoint 5 was registered (report is a barrier)
        return len(steps_log.read_text().splitlines()) - 1 if steps_log.exists() else 0
    outcome: dict = {}

    def train() -> None:
        try:
            outcome.update(run_train_rm(cfg))
        except Exception as exc:  # noqa: BLE001  (surfaced by the asserts below)
            outcome["error"] = exc

    thread = threading.Thread(target=train, daemon=True)
    thread.start()
    deadline = time.time() + 300
    while logged_steps() < 7 and thread.is_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert "error" not in outcome, outcome.get("error")
    workers = list_actors(address=ray_local.get_runtime_context().gcs_address, detail=True,
                          filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert workers, "no live train worker to kill"
    os.kill(workers[0].pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert outcome and "error" not in outcome, f"training did not finish after the kill: {outcome.get('error')}"
    evals = _eval_log(cfg)
    resumed_at = int(evals["resumed_from_step"].max())
    assert resumed_at >= 5 and resumed_at % 5 == 0, "not resumed from a checkpoint step"  # 0: started over
    assert resumed_at in evals["step"].tolist()
    steps = pd.read_csv(cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "train.csv")["step"].to_numpy()
    # every step logged once: those run between the checkpoint and the kill were dropped when they ran again
    assert steps.tolist() == list(range(1, 21))
    assert evals["step"].is_unique
    assert outcome["final_step"] == 20 and evals["step"].max() == 20
