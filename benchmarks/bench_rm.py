"""Reward-model training speed (issue #5): CRM over BT step time, ours vs TRL's RewardTrainer, 1 -> 2 workers.

    python benchmarks/bench_rm.py [--pairs 3000] [--steps 40] [--rounds 2]   # writes benchmarks/results/rm.json

Same backbone (all-MiniLM-L6-v2 + LoRA r=8), same VADER pairs and token ids, batch of 16 pairs, max length 64,
fp32, one torch thread per process. Our numbers are the median seconds per optimizer step logged by the Ray
Train workers (after 5 warm-up steps); TRL's the median of its step times measured by a callback, in this
process. `ours_over_trl` is TRL's step over our BT step on packed rows (`train.pack_tokens=128`: no padding
runs through the model; TRL pads each batch to its longest pair); `ours_padded_over_trl` the same with our
right-padded rows, and `padding_share` the share of padding among the positions each of our runs computed.
Ratios are taken within one run of this script. The 1-worker BT (padded, packed), CRM and TRL runs alternate for
`--rounds` rounds, every side gets the same rounds and the same rule (the median over its rounds), and every
round is reported (`rounds_seconds_per_step`, and `ours_over_trl_rounds` round by round): the order of runs and
the machine's drift must not decide a ratio. `crm_over_bt_step` itself comes from BT and CRM
steps alternated in one process on the same batches (`interleaved`); the run-level ratio is kept beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import time
from pathlib import Path

import pandas as pd
import torch

from ray_crm.config import load_config, run_name
from ray_crm.data.pipeline import read_prepared_table, run_prepare
from ray_crm.train.rm_trainer import run_train_rm

RESULTS = Path(__file__).parent / "results" / "rm.json"
WARMUP = 5
PACK_TOKENS = 128  # rows of two max-length sequences: attention under the block mask stays a small share


def _base(out: Path, pairs: int, steps: int) -> list[str]:
    return [
        f"output_dir={out}", "name=bench", "model.name=minilm", "model.max_length=64",
        "model.lora.rank=8", "model.lora.alpha=16", f"data.vader={{num_pairs: {pairs}, length_bias: 0.8}}",
        "data.split.by=pair", "data.spurious=[{name: length, kind: length, bins: 10}]",
        "train.batch_size=16", f"train.max_steps={steps}", "train.lr=1e-4", "ray.torch_threads=1",
    ]


def ours(base: list[str], *extra: str, shares: dict[str, list[float]] | None = None, key: str = "") -> float:
    """Median seconds per optimizer step of one of our training runs (a fresh run: `extra` names it); the mean
    share of padding in the positions its model ran goes to `shares[key]`."""
    cfg = load_config(None, [*base, *extra])
    run_train_rm(cfg)
    log = pd.read_csv(cfg.stage_dir("train-rm") / run_name(cfg) / "logs" / "train.csv")
    if shares is not None:
        shares.setdefault(key, []).append(float(log["padding_share"].mean()))
    return statistics.median(16 / log["pairs_per_s"].iloc[WARMUP:])


def interleaved(base: list[str], steps: int) -> dict[str, float]:
    """Median seconds of a BT step and of a CRM step taken alternately in one process on the same batches.

    The same model and stratified batches as the trainer, without Ray: BT is the plain `bradley_terry_loss` (not
    the trainer's lambda-0 path, which still measures the penalty without gradient), CRM is `crm_loss` at lambda 1.
    Machine drift between separate runs cancels, which the run-level ratio cannot resolve below ~10%.
    """
    from ray_crm.data.pipeline import load_manifest
    from ray_crm.data.sampler import StratifiedBatchSampler
    from ray_crm.losses import bradley_terry_loss, crm_loss
    from ray_crm.models.loading import load_reward_model, load_tokenizer, pad_pairs, score
    from ray_crm.train.rm_trainer import COLUMNS, mmd_settings

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(None, [*base, "loss.type=crm", "loss.lambda_mmd=1.0"])
    table = read_prepared_table(cfg.prepared_dir(), "train")  # a reward model's pairs have no response starts
    rows = {c: table[c].to_numpy(zero_copy_only=False) for c in COLUMNS if c != "pair_id" and c in table.column_names}
    mmd = mmd_settings(cfg, load_manifest(cfg.prepared_dir())["num_bins"])
    tok = load_tokenizer(cfg.model)
    model = load_reward_model(cfg.model, tok.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    plan = list(StratifiedBatchSampler(rows["stratum"], batch_size=16, seed=0).batches(0))[:steps]
    times: dict[str, list[float]] = {"bt": [], "crm": []}
    for i, idx in enumerate(plan):
        order = ["bt", "crm"]
        for kind in order if i % 2 else order[::-1]:  # alternate which goes first
            start = time.perf_counter()
            part = {k: v[idx] for k, v in rows.items()}
            rewards, _ = score(model, pad_pairs(part, tok.pad_token_id))
            n = len(idx)
            if kind == "bt":
                loss, _ = bradley_terry_loss(rewards[:n], rewards[n:])
            else:
                loss, _ = crm_loss(rewards[:n], rewards[n:], torch.as_tensor(part["bin_chosen"]),
                                   torch.as_tensor(part["bin_rejected"]), 1.0, cfg.loss.variant, mmd)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            times[kind].append(time.perf_counter() - start)
    return {k: statistics.median(v[WARMUP:]) for k, v in times.items()}


def trl(base: list[str], steps: int) -> float:
    """Median seconds per step of TRL's RewardTrainer on the same token ids (chosen_ids / rejected_ids)."""
    from datasets import Dataset
    from peft import LoraConfig, TaskType
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl import RewardConfig, RewardTrainer

    from ray_crm.assets import resolve_model

    torch.set_num_threads(1)
    cfg = load_config(None, base)
    table = read_prepared_table(cfg.prepared_dir(), "train", ["chosen_input_ids", "rejected_input_ids"])
    data = Dataset.from_dict({"chosen_ids": [list(map(int, x)) for x in table["chosen_input_ids"].to_pylist()],
                              "rejected_ids": [list(map(int, x)) for x in table["rejected_input_ids"].to_pylist()]})
    path = resolve_model("minilm")
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    args = RewardConfig(
        output_dir=str(Path(cfg.output_dir) / "trl"), per_device_train_batch_size=16, max_steps=steps,
        learning_rate=1e-4, bf16=False, gradient_checkpointing=False, max_length=64, report_to=[],
        logging_steps=10**6, save_strategy="no", dataloader_num_workers=0, use_cpu=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=data,
                            processing_class=AutoTokenizer.from_pretrained(path), callbacks=[Clock()],
                            peft_config=LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16))
    trainer.train()
    return statistics.median(b - a for a, b in zip(stamps[WARMUP:], stamps[WARMUP + 1:]))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pairs", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default="outputs/bench_rm")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)  # a finished run of the same config would be resumed, not timed
    base = _base(out, args.pairs, args.steps)
    run_prepare(load_config(None, base))
    one = ["train.num_workers=1", "train.cpus_per_worker=1.0", "train.zero_stage=0"]
    packed = f"train.pack_tokens={PACK_TOKENS}"
    rounds: dict[str, list[float]] = {"bt_1w": [], "bt_1w_packed": [], "crm_1w": [], "trl_1w": []}
    shares: dict[str, list[float]] = {}
    for i in range(args.rounds):  # run names hash the config: the round's seed makes each run a fresh one
        seed = f"train.seed={i}"
        rounds["bt_1w"].append(ours(base, *one, seed, "loss.type=bt", shares=shares, key="padded"))
        rounds["bt_1w_packed"].append(ours(base, *one, seed, "loss.type=bt", packed, shares=shares, key="packed"))
        rounds["crm_1w"].append(ours(base, *one, seed, "loss.type=crm", "loss.lambda_mmd=1.0"))
        rounds["trl_1w"].append(trl(base, args.steps))
    step = {k: statistics.median(v) for k, v in rounds.items()}
    step["crm_2w"] = ours(base, "train.num_workers=2", "train.cpus_per_worker=0.5", "train.zero_stage=2",
                          "loss.type=crm", "loss.lambda_mmd=1.0")
    alternated = interleaved(base, args.steps)
    result = {
        "command": f"python benchmarks/bench_rm.py --pairs {args.pairs} --steps {args.steps} --rounds {args.rounds}",
        "rounds_seconds_per_step": rounds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__},
        "seconds_per_step": step,
        "pairs_per_s": {k: 16 / v for k, v in step.items()},
        "crm_over_bt_step": alternated["crm"] / alternated["bt"],
        "interleaved_seconds_per_step": alternated,
        "crm_over_bt_run_level": step["crm_1w"] / step["bt_1w"],
        "padding_share": {k: statistics.mean(v) for k, v in shares.items()},
        "packed_over_padded": step["bt_1w"] / step["bt_1w_packed"],
        "ours_over_trl": step["trl_1w"] / step["bt_1w_packed"],
        "ours_over_trl_rounds": [t / b for t, b in zip(rounds["trl_1w"], rounds["bt_1w_packed"], strict=True)],
        "ours_padded_over_trl": step["trl_1w"] / step["bt_1w"],
        "ours_padded_over_trl_rounds": [t / b for t, b in zip(rounds["trl_1w"], rounds["bt_1w"], strict=True)],
        "scaling_1_to_2_workers": step["crm_1w"] / step["crm_2w"],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print("| run | s/step | pairs/s |\n|---|---|---|")
    for k, v in step.items():
        print(f"| {k} | {v:.3f} | {16 / v:.1f} |")
    print({k: round(result[k], 3) for k in ("crm_over_bt_step", "packed_over_padded", "ours_over_trl",
                                            "ours_padded_over_trl", "scaling_1_to_2_workers")})
    print("padding share of the positions run:", result["padding_share"])


if __name__ == "__main__":
    main()
