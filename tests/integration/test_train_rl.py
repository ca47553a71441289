"""`train-rl` end to end on real Ray and vLLM: a tiny Llama policy, a tiny BERT RM, a VADER gold scorer."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from ray_crm.config import ConfigError, dump_config, validate
from ray_crm.rl.grpo_trainer import run_train_rl

pytestmark = pytest.mark.integration


def _config(tmp_path, policy, rm, prompts_file, steps: int):
    return validate({
        "name": "rl", "output_dir": str(tmp_path / "out"), "ray": {"num_cpus": 2},
        "rollout": {"cpus_per_engine": 0.5, "kv_cache_gib": 0.25, "max_model_len": 256, "n_samples": 4,
                    "max_new_tokens": 8, "temperature": 1.0, "enforce_eager": True},
        "reward": {"model": str(rm), "cpus_per_actor": 0.25, "gold": [{"name": "vader", "kind": "vader"}]},
        "rl": {"policy": str(policy), "steps": steps, "prompts_per_step": 2, "micro_batch_size": 4, "lr": 2e-2,
               "regularizer": "gr", "gr_gamma": 0.1, "checkpoint_every": 2, "learner_cpus": 0.25,
               "prompts": [str(prompts_file)], "lora": {"rank": 4, "alpha": 8}},
    })


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(("advantage", "zero"), [("gae", 3), ("rloo", 2)])
def test_ppo_and_rloo_with_gr_train_on_two_zero_ranks_sync_every_step_and_resume_at_the_saved_step(
        ray_local, tmp_path, tiny_llama_dir, tiny_bert_dir, advantage, zero):
    """PPO (policy and critic) on two ZeRO-3 ranks, RLOO on two ZeRO-2 ranks. Dr.GRPO, the default estimator, runs
    end to end in the sweep and kill-and-resume tests below."""
    from transformers import AutoModelForCausalLM

    prompts = tmp_path / "prompts.jsonl"
    lines = [{"prompt": p} for p in ["the movie was", "i love this film", "what a boring plot"]]
    lines.insert(1, {"text": "no prompt field"})
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "a sentence about the weather"}) + "\n")

    def config(steps, **rl):
        data = _config(tmp_path, tiny_llama_dir, tiny_bert_dir, prompts, steps).model_dump(mode="json")
        data["rl"].update({"advantage": advantage, "num_workers": 2, "zero_stage": zero, "epochs": 2,
                           "minibatches": 2, **rl})
        if advantage == "gae":
            data["rl"].update({"kl_in_reward": 0.05, "critic": {"lr": 1e-2, "lora": {"rank": 4, "alpha": 8}}})
        else:  # held-out prompts: the initial policy and the last step's are evaluated on them
            data["rl"].update({"eval_prompts": [str(held_out)], "eval_samples": 3})
        return validate(data)

    first = run_train_rl(config(2))
    out = tmp_path / "out" / "rl" / "train-rl"
    bad = [json.loads(line) for line in (out / "quarantine.jsonl").read_text().splitlines()]
    assert [(b["line"], b["field"], b["reason"]) for b in bad] == [(2, "prompt", "missing")]
    # the same command with more steps resumes at the saved step
    again = run_train_rl(config(3))
    assert first["resumed_from_step"] is None and again["resumed_from_step"] == 2
    rows = _rows(out / "rl.csv")
    if advantage == "rloo":
        evaluated = [int(r["step"]) for r in rows if r.get("eval/gold_vader_mean", "") != ""]
        assert evaluated == [0, 2, 3] and all(r["eval/reward_mean"] != "" for r in rows if int(r["step"]) in evaluated)
        rows = rows[1:]  # step 0 holds the initial policy's evaluation only
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    # the rollouts of step k came from the weights of step k - 1: every step's weights reached the engine, and
    # the learner's recomputed log-probs match the engine's within fp32 noise at every step, the resumed one too
    assert [int(float(r["policy_version"])) for r in rows] == [0, 1, 2]
    assert all(float(r["policy/engine_logprob_gap"]) < 1e-3 for r in rows)
    for key in ("reward_mean", "gold_vader_mean", "gr/g1_norm", "gr/g2_norm", "time/sync_s", "response_tokens_mean"):
        assert all(r[key] != "" for r in rows), key
    # every score finite, every update taken (2 epochs x 2 minibatches)
    assert all((float(r["skipped"]), r["skip_reason"], float(r["dropped_rows"]), float(r["policy/updates"]))
               == (0.0, "", 0.0, 4.0) for r in rows)
    assert all(float(r["policy/entropy"]) > 0 and float(r["policy/kl_to_initial"]) >= 0 for r in rows)
    assert Path(again["monitor_plot"]).stat().st_size > 10_000
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000003"]
    if advantage == "gae":
        assert all(float(r["critic/loss"]) > 0 and r["policy/kl_to_reference"] != "" for r in rows)
    else:
        assert "critic/loss" not in rows[0]

    # the policy moved away from the initial weights (so a missed sync would have shown in the gap)
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        start = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)(input_ids=ids).logits
        trained = AutoModelForCausalLM.from_pretrained(again["policy"])(input_ids=ids).logits
    assert (start - trained).abs().max() > 1e-3
    # a finished run asked again starts nothing and reports what it has ...
    finished = run_train_rl(config(3))
    assert finished["resumed_from_step"] == 3 and finished["policy"] == again["policy"]
    assert len(_rows(out / "rl.csv")) == len(rows) + (advantage == "rloo")
    # ... and a rerun under other learning settings is refused: that would be another experiment in the same folder
    data = config(5).model_dump(mode="json")
    data["rl"]["lr"], data["rollout"]["temperature"] = 1e-3, 0.9
    with pytest.raises(ConfigError, match=r"rl\.lr, rollout\.temperature differ.*another `name` or `rl\.output_dir`"):
        run_train_rl(validate(data))


def test_a_tune_sweep_of_gr_gamma_runs_rl_trials_and_picks_one(ray_local, tmp_path, tiny_llama_dir, tiny_bert_dir):
    from ray_crm.tune.sweep import run_sweep

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i love this film"]))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text(json.dumps({"prompt": "a sentence about the weather"}) + "\n")
    data = _config(tmp_path, tiny_llama_dir, tiny_bert_dir, prompts, steps=2).model_dump(mode="json")
    data["rl"].update({"eval_prompts": [str(held_out)], "eval_samples": 2})
    # ranked by the held-out score, which only the initial and the last steps measure: every report carries
    # the latest one (Tune refuses a result without its metric)
    data["sweep"] = {"stage": "train-rl", "metric": "eval/gold_vader_mean", "bias_metric": "response_tokens_mean",
                     "space": {"rl.gr_gamma": {"grid": [0.0, 0.1]}}}
    summary = run_sweep(validate(data))
    assert summary["trials"] == 2 and summary["errors"] == 0
    table = pd.read_csv(tmp_path / "out" / "rl" / "sweep" / "results.csv")
    assert len(table) == 2 and "rl.gr_gamma" in table.columns
    trial_logs = sorted((tmp_path / "out").glob("rl-*/train-rl/rl.csv"))
    assert len(trial_logs) == 2 and all([r["step"] for r in _rows(p)] == ["0", "1", "2"] for p in trial_logs)
    finals = sorted(float(_rows(p)[-1]["eval/gold_vader_mean"]) for p in trial_logs)
    assert sorted(table["eval/gold_vader_mean"]) == pytest.approx(finals)  # the last evaluation ranks the trials
    assert summary["chosen"]["rl.gr_gamma"] in (0.0, 0.1)


def test_a_run_killed_mid_training_resumes_from_its_last_checkpoint_and_logs_each_step_once(
        ray_local, tmp_path, tiny_llama_dir, tiny_bert_dir):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "i love this film"]))
    data = _config(tmp_path, tiny_llama_dir, tiny_bert_dir, prompts, steps=7).model_dump(mode="json")
    data["rl"]["checkpoint_every"] = 3
    cfg = validate(data)
    (tmp_path / "rl.yaml").write_text(dump_config(cfg))
    out = tmp_path / "out" / "rl" / "train-rl"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the child starts its own local cluster
    with (tmp_path / "child.log").open("w") as sink:
        child = subprocess.Popen([sys.executable, "-m", "ray_crm.cli", "train-rl", "--config", str(tmp_path / "rl.yaml")],
                                 env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and child.poll() is None:
            if (out / "checkpoints" / "step_000003").is_dir() and len(_lines(out / "rl.csv")) >= 5:
                break  # step 4 logged, its checkpoint (step 6) not yet written
            time.sleep(0.05)
        assert child.poll() is None, (tmp_path / "child.log").read_text()[-3000:]
        os.killpg(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    logged = [int(r["step"]) for r in _rows(out / "rl.csv")]
    checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*"))
    assert checkpoints == ["step_000003"] and max(logged) > 3  # steps after the checkpoint were lost

    summary = run_train_rl(cfg)
    assert summary["resumed_from_step"] == 3
    rows = _rows(out / "rl.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 8))  # each step once: the lost ones were redone
    assert [int(float(r["policy_version"])) for r in rows] == list(range(7))
    assert all(float(r["policy/engine_logprob_gap"]) < 1e-3 for r in rows)
    samples = [json.loads(line)["step"] for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples == sorted(samples) and len(samples) == 7 * 2


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []
