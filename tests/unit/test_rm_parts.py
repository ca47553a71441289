"""Pure parts of reward-model training: DeepSpeed config, pair batching, scoring, run naming."""

import pytest
import torch

from ray_crm.config import load_config, run_name
from ray_crm.eval.metrics import z_balanced_accuracy
from ray_crm.models.loading import load_reward_model, load_tokenizer, pad_pairs, score
from ray_crm.train.deepspeed_config import deepspeed_config, micro_batch_size


def test_deepspeed_config_follows_the_typed_config():
    cfg = load_config(None, ["train.batch_size=32", "train.grad_accum=2", "train.zero_stage=3",
                             "train.offload=true", "model.precision=bf16"])
    ds = deepspeed_config(cfg.train, cfg.model, world_size=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_accumulation_steps"] == 2 and ds["bf16"]["enabled"]
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="divisible"):
        micro_batch_size(load_config(None, ["train.batch_size=10"]).train, world_size=4)


def test_run_name_changes_with_training_config_only():
    a = load_config(None, ["loss.type=crm", "loss.lambda_mmd=1.0"])
    assert run_name(a) == run_name(load_config(None, ["loss.type=crm", "loss.lambda_mmd=1.0", "train.max_failures=3"]))
    assert run_name(a) != run_name(load_config(None, ["loss.type=crm", "loss.lambda_mmd=0.5"]))
    assert "crm-unco-l1" in run_name(a)
    # the validation twins are scored, not trained on: where they live does not rename the run
    assert run_name(a) == run_name(load_config(None, ["loss.type=crm", "loss.lambda_mmd=1.0", "data.twins=x.parquet"]))
    # nor does the export's calibration, applied after training
    assert run_name(a) == run_name(load_config(None, ["loss.type=crm", "loss.lambda_mmd=1.0", "train.calibrate_scale=false"]))


def test_balanced_accuracy_gives_a_z_shortcut_nothing():
    """On a split where the chosen response holds Z in 80% of pairs, a reward that reads Z alone scores 80% plain
    accuracy but 50% balanced; a reward that reads the content scores the same on both."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 1000
    z_chosen = (rng.random(n) < 0.8).astype(int)
    z_rejected = (rng.random(n) < 0.2).astype(int)
    shortcut = np.stack([z_chosen + 1e-3 * rng.random(n), z_rejected + 1e-3 * rng.random(n)], 1)
    assert (shortcut[:, 0] > shortcut[:, 1]).mean() > 0.75
    assert z_balanced_accuracy(shortcut[:, 0], shortcut[:, 1], z_chosen, z_rejected) == pytest.approx(0.5, abs=0.03)
    content = np.stack([np.ones(n), np.zeros(n)], 1)
    content[: n // 4] = content[: n // 4, ::-1]  # wrong on a quarter of the pairs, whatever Z
    order = rng.permutation(n)
    assert z_balanced_accuracy(content[order][:, 0], content[order][:, 1], z_chosen, z_rejected) == pytest.approx(0.75, abs=0.05)


def test_pairs_score_identically_alone_and_padded_in_a_batch(tiny_bert_dir):
    cfg = load_config(None, [f"model.name={tiny_bert_dir}", "model.lora.rank=4"])
    tok = load_tokenizer(cfg.model)
    model = load_reward_model(cfg.model, tok.pad_token_id).eval()
    enc = lambda p, r: tok(p, r)
    short, long = enc("the movie", "great"), enc("the movie was", "really quite boring and bad")
    rows = {
        "chosen_input_ids": [short["input_ids"], long["input_ids"]],
        "rejected_input_ids": [long["input_ids"], short["input_ids"]],
        "chosen_token_type_ids": [short["token_type_ids"], long["token_type_ids"]],
        "rejected_token_type_ids": [long["token_type_ids"], short["token_type_ids"]],
    }
    batch = pad_pairs(rows, tok.pad_token_id)
    assert batch["input_ids"].shape == (4, len(long["input_ids"]))
    with torch.no_grad():
        rewards, reps = score(model, batch, with_representation=True)
        alone = score(model, {k: torch.tensor([v]) for k, v in short.items()})[0]
    assert rewards.shape == (4,) and reps.shape == (4, 64)
    torch.testing.assert_close(rewards[0], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards[0], rewards[3], atol=1e-5, rtol=0)


@pytest.mark.parametrize("lora", [True, False])
def test_an_export_with_a_reward_scale_scores_that_many_times_the_trained_model(tiny_bert_dir, tmp_path, lora):
    """The merged model and (LoRA) the adapter on its base both give `reward_scale` x the trained rewards."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from ray_crm.models.loading import export_model

    cfg = load_config(None, [f"model.name={tiny_bert_dir}", "model.lora.rank=4", f"model.lora.enabled={str(lora).lower()}"])
    tok = load_tokenizer(cfg.model)
    model = load_reward_model(cfg.model, tok.pad_token_id).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # a "trained" head and adapter (or model): not the initial values
                p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "weights")
    merged = export_model(cfg.model, tmp_path / "weights", tmp_path / "export", {}, reward_scale=2.5)
    enc = tok(["the movie", "a day"], ["great fun", "long and dull"], padding=True, return_tensors="pt")
    with torch.no_grad():
        trained = score(model, enc)[0]
        exported = AutoModelForSequenceClassification.from_pretrained(merged).eval()
        torch.testing.assert_close(score(exported, enc)[0], 2.5 * trained, atol=1e-5, rtol=1e-5)
        if lora:
            base = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=1)
            adapter = PeftModel.from_pretrained(base, tmp_path / "export" / "adapter").eval()
            torch.testing.assert_close(score(adapter, enc)[0], 2.5 * trained, atol=1e-5, rtol=1e-5)


def test_prepared_data_with_other_bins_or_tokenizer_is_refused_naming_the_field(tmp_path):
    from ray_crm.data.pipeline import check_prepared_for

    spurious = ["data.spurious=[{name: length, kind: length, bins: 10}]"]
    made = load_config(None, spurious)
    manifest = {"data_config": made.data.model_dump(mode="json"), "tokenizer": {"name": made.model.name}}
    check_prepared_for(made, manifest, tmp_path)  # the same settings: accepted
    check_prepared_for(load_config(None, [*spurious, "train.lr=1e-3", "data.twins=x.parquet"]), manifest, tmp_path)
    with pytest.raises(ValueError, match=r"prepared with other data\.spurious than"):
        check_prepared_for(load_config(None, [*spurious, "data.spurious.0.bins=3"]), manifest, tmp_path)
    with pytest.raises(ValueError, match=r"data\.binning, model\.name"):
        check_prepared_for(load_config(None, [*spurious, "data.binning.min_count=5", "model.name=smollm2"]),
                           manifest, tmp_path)


def test_the_penalty_ramps_in_linearly_and_a_ramp_renames_the_run():
    from ray_crm.losses import warmed_up_lambda

    assert [warmed_up_lambda(0.3, s, 4) for s in range(6)] == pytest.approx([0.0, 0.075, 0.15, 0.225, 0.3, 0.3])
    assert warmed_up_lambda(0.3, 0, 0) == 0.3  # no ramp: full weight from the first step
    plain = load_config(None, ["loss.type=crm", "loss.lambda_mmd=0.3"])
    ramped = load_config(None, ["loss.type=crm", "loss.lambda_mmd=0.3", "loss.lambda_warmup=0.25"])
    assert "-w" not in run_name(plain) and "-l0.3-w0.25-" in run_name(ramped)
    assert run_name(plain) == run_name(load_config(None, ["loss.type=crm", "loss.lambda_mmd=0.3", "loss.lambda_warmup=0"]))
