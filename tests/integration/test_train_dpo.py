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
from ray_crm.data.pipeline import load_manifest, manifest_digest, read_prepared_table, run_prepare
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


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """Validation twins: two answers, each with a padded copy."""
    path = tmp_path_factory.mktemp("twins") / "twins.parquet"
    responses = ["good film", "good film " + "indeed " * 6, "dull and slow", "dull and slow " + "sadly " * 5]
    pd.DataFrame({"prompt": ["review:"] * 4, "response": responses, "twin": ["a", "a", "b", "b"]}).to_parquet(path)
    return path


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


def test_causal_dpo_at_lambda_zero_trains_as_dpo_step_for_step(prepared, twins):
    dpo = _cfg(prepared, "loss.type=dpo", "loss.beta=0.5", f"data.twins={twins}")  # reused by the reference test
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
    card = json.loads((merged.parent / "model_card.json").read_text())
    assert card["config"]["loss"]["type"] == "causal_dpo"
    assert card["data_manifest"] == manifest_digest(load_manifest(cfg.prepared_dir()))  # which data made it
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


def test_ipo_trains_on_two_workers_on_packed_rows(prepared):
    cfg = _cfg(prepared, "loss.type=ipo", "loss.beta=0.5", "train.pack_tokens=256")
    run_train_dpo(cfg)
    train = _logs(cfg, "train")
    assert train["loss/total"].iloc[0] == pytest.approx(1.0, abs=1e-3)  # (0 - 1/(2 beta))^2 at pi = pi_ref
    assert train["loss/total"].iloc[-1] < train["loss/total"].iloc[0]


def test_a_precomputed_reference_trains_as_the_adapter_switched_off_and_lets_a_full_fine_tune_train(prepared,
                                                                                                  twins):
    same = ["loss.type=dpo", "loss.beta=0.5", f"data.twins={twins}"]
    on_the_fly, cached = _cfg(prepared, *same), _cfg(prepared, *same, "loss.reference=precomputed")
    assert run_name(on_the_fly) != run_name(cached)
    for cfg in (on_the_fly, cached):  # the first was trained by the lambda-zero test: this resumes its end
        run_train_dpo(cfg)
    for kind, columns in (("train", ["loss/total", "reward/margin"]), ("eval", ["val_bt_loss", "val_ci_gap"])):
        a, b = _logs(on_the_fly, kind), _logs(cached, kind)
        np.testing.assert_allclose(a[columns], b[columns], rtol=0, atol=2e-5)
    assert _logs(cached, "eval")["val_accuracy"].tolist() == _logs(on_the_fly, "eval")["val_accuracy"].tolist()

    (cache,) = (p for p in (Path(cached.output_dir) / "reference_logps").iterdir() if not p.name.startswith("."))
    rows = json.loads((cache / "done.json").read_text())["rows"]
    splits = {s: read_prepared_table(cached.prepared_dir(), s).num_rows for s in ("train", "validation")}
    assert rows == {**splits, "twins": 4}
    written = (cache / "done.json").stat().st_mtime_ns

    # no adapter to switch off: only the precomputed reference makes a full fine-tune possible
    full = [*same, "model.lora.enabled=false", "train.lr=1e-3", "name=full"]
    with pytest.raises(ValueError, match="loss.reference=precomputed"):
        _cfg(prepared, *full)
    cfg = _cfg(prepared, *full, "loss.reference=precomputed")
    result = run_train_dpo(cfg)
    train = _logs(cfg, "train")
    assert train["loss/total"].iloc[0] == pytest.approx(np.log(2), abs=1e-4)  # pi = pi_ref at the start
    assert train["loss/total"].iloc[-1] < train["loss/total"].iloc[0]
    assert (cache / "done.json").stat().st_mtime_ns == written  # the cache was reused, not computed again
    assert (Path(result["model"]) / "config.json").is_file() and not (Path(result["model"]).parent / "adapter").exists()


def test_a_causal_dpo_sweep_trains_its_trials_on_the_reference_its_driver_computed(prepared):
    from ray_crm.train.reference_logps import cache_key
    from ray_crm.tune.sweep import run_sweep

    cfg = _cfg(prepared, "name=dposweep", "loss.type=causal_dpo", "loss.reference=precomputed", "train.max_steps=2",
               "train.num_workers=1", "train.zero_stage=0", "sweep.stage=train-dpo",
               "sweep.space={loss.lambda_mmd: {grid: [0.5]}}")  # one trial keeps the suite short
    summary = run_sweep(cfg)
    table = pd.read_csv(summary["results"].replace(".md", ".csv"))
    assert len(table) == 1 and (table["status"] == "DONE").all()
    done = Path(cfg.output_dir) / "reference_logps" / cache_key(cfg, load_manifest(cfg.prepared_dir())) / "done.json"
    assert json.loads(done.read_text())["rows"]["train"] == read_prepared_table(cfg.prepared_dir(), "train").num_rows
    for model in table["model"]:
        card = json.loads((Path(model).parent / "model_card.json").read_text())
        assert card["config"]["loss"]["reference"] == "precomputed"
