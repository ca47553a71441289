"""DPO, IPO and Causal DPO for real: Ray Train workers running DeepSpeed ZeRO-2 with LoRA on a tiny Llama,
prepared through `prepare` with the chat template (each response's start marked)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from ray_crm.config import load_config, run_name
from ray_crm.data.pipeline import read_prepared_table, run_prepare
from ray_crm.train.rm_trainer import VAL_SCORES, run_train_dpo, run_train_rm
from tests.integration.test_train_rm import _pairs


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_llama_dir, ray_local):
    root = tmp_path_factory.mktemp("dpo")
    src = root / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(p) for p in _pairs(200)))
    overrides = [
        f"output_dir={root}", "name=tiny", f"data.paths=[{src}]", f"data.output_dir={root / 'prepared'}",
        f"model.name={tiny_llama_dir}", "model.max_length=64", "model.lora.rank=8", "model.lora.alpha=16",
        "data.template=chat", "data.split.validation=0.2", "data.split.test=0.05", "data.split.by=pair",
        "data.spurious=[{name: length, kind: length, unit: words, bins: 3}]", "data.binning.min_count=5",
    ]
    run_prepare(load_config(None, overrides))
    return overrides


def _cfg(prepared, *extra):
    base = ["train.num_workers=2", "train.cpus_per_worker=0.5", "train.batch_size=8", "train.lr=0.01",
            "train.zero_stage=2", "train.max_steps=3"]
    return load_config(None, [*prepared, *base, *extra])


def _logs(cfg, kind: str) -> pd.DataFrame:
    return pd.read_csv(cfg.stage_dir("train-dpo") / run_name(cfg) / "logs" / f"{kind}.csv")


def test_prepare_marks_where_each_chat_response_starts(prepared, tiny_llama_dir):
    from transformers import AutoTokenizer

    cfg = _cfg(prepared)
    table = read_prepared_table(cfg.prepared_dir(), "train").to_pandas().head(5)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    for _, row in table.iterrows():
        for side in ("chosen", "rejected"):
            ids, start = list(row[f"{side}_input_ids"]), int(row[f"{side}_response_start"])
            assert tok.decode(ids[start:]).startswith(row[side])


def test_causal_dpo_at_lambda_zero_trains_as_dpo_step_for_step(prepared):
    dpo = _cfg(prepared, "loss.type=dpo", "loss.beta=0.5")
    causal = _cfg(prepared, "loss.type=causal_dpo", "loss.beta=0.5", "loss.lambda_mmd=0")
    for cfg in (dpo, causal):
        run_train_dpo(cfg)
    a, b = _logs(dpo, "train"), _logs(causal, "train")
    assert a["step"].tolist() == [1, 2, 3]
    for column in ("loss/total", "reward/margin", "mmd/penalty"):
        np.testing.assert_allclose(a[column], b[column], rtol=0, atol=1e-6)
    assert a["loss/total"].iloc[0] == pytest.approx(np.log(2), abs=1e-4)  # pi = pi_ref at the start


def test_causal_dpo_learns_resumes_and_exports_a_policy_whose_implicit_reward_is_the_trained_one(prepared,
                                                                                              tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from ray_crm.models.loading import pad_sequences
    from ray_crm.models.logprobs import sequence_logprobs

    cfg = _cfg(prepared, "loss.type=causal_dpo", "loss.variant=conditional", "loss.lambda_mmd=0.5",
               "train.max_steps=8", "train.checkpoint_every=4", "loss.beta=0.5", "name=cdpo")
    with pytest.raises(ValueError, match="train-dpo"):
        run_train_rm(cfg)
    result = run_train_dpo(cfg)
    evals = _logs(cfg, "eval")
    assert evals["val_bt_loss"].iloc[-1] < np.log(2) - 0.02 and result["val_accuracy"] > 0.6
    assert (_logs(cfg, "train")["mmd/penalty"].iloc[1:] > 0).all()  # 0 at the start: pi = pi_ref for every pair

    # the same config again resumes from its last checkpoint (step 8, the end) instead of training afresh
    again = run_train_dpo(cfg)
    assert _logs(cfg, "train")["step"].tolist() == list(range(1, 9)) and len(_logs(cfg, "eval")) == len(evals)
    assert again["model"] == result["model"] and again["val_accuracy"] == result["val_accuracy"]

    merged = Path(result["model"])
    assert json.loads((merged.parent / "model_card.json").read_text())["config"]["loss"]["type"] == "causal_dpo"
    policy = AutoModelForCausalLM.from_pretrained(merged).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    trained = np.load(merged.parent / VAL_SCORES)
    val = read_prepared_table(cfg.prepared_dir(), "validation").to_pandas().set_index("pair_id")
    rows = val.loc[trained["pair_id"][:8]]
    batch = pad_sequences(list(rows["chosen_input_ids"]), None, policy.config.pad_token_id)
    with torch.no_grad():
        ratio = (sequence_logprobs(policy, batch, rows["chosen_response_start"].to_numpy())
                 - sequence_logprobs(base, batch, rows["chosen_response_start"].to_numpy()))
    np.testing.assert_allclose(0.5 * ratio.numpy(), trained["chosen"][:8], atol=1e-4, rtol=1e-4)


def test_ipo_trains_on_two_workers(prepared):
    cfg = _cfg(prepared, "loss.type=ipo", "loss.beta=0.5")
    run_train_dpo(cfg)
    train = _logs(cfg, "train")
    assert train["loss/total"].iloc[0] == pytest.approx(1.0, abs=1e-3)  # (0 - 1/(2 beta))^2 at pi = pi_ref
    assert train["loss/total"].iloc[-1] < train["loss/total"].iloc[0]
