"""Causal DPO's training step over DPO's: what the MMD penalty on the implicit reward adds to a step.

    python benchmarks/bench_dpo.py            # writes benchmarks/results/dpo_step.json (or --out FILE)

SmolLM2-135M-Instruct + LoRA (r=16, as configs/dpo_length.yaml), fp32 on CPU, one process, 2 torch threads, the
same batch of real length-benchmark pairs for both sides (chat template, each response's start marked as
`prepare` marks it, 10 length-quantile bins of the batch). A step is what the trainer does per micro-step: the implicit reward of the
2B sequences (policy forward with gradient, reference forward with the adapter off), the loss from the registry
(`dpo`, or `causal_dpo` conditional at lambda 0.1), backward and an AdamW step. Both sides run the same number of
rounds, interleaved; the ratio is of the medians of CPU time, and every round is reported. A third side,
`dpo_precomputed`, takes the reference log-probs computed once before the rounds (`loss.reference=precomputed`):
`reference_speedup` = its median over plain `dpo`'s. A fourth, `dpo_packed`, runs the same step on the sequences
packed into padding-free rows of `--pack-tokens` (`train.pack_tokens`): `packed_speedup` = plain `dpo`'s median
over its own, with each layout's share of padding beside it.

`--trl` also times TRL's `DPOTrainer` on the same pairs (repeated), model, LoRA, batch, beta, precision and threads
(its reference: the adapter switched off, as ours), wall seconds per step after warm-up from a step-end callback,
against the wall time of our `dpo` step: `ours_over_trl_dpo` = TRL's median / ours (above 1: ours is faster).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ray_crm.assets import resolve_model
from ray_crm.config import load_config
from ray_crm.data.encode import PairEncoder
from ray_crm.losses import MMDConfig, PairLossSettings, pair_loss
from ray_crm.models.loading import load_policy_model, pad_sequences, tokenizer_at
from ray_crm.models.logprobs import implicit_reward, sequence_logprobs
from ray_crm.models.packing import pack_sequences

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "dpo_step.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--trl", action="store_true", help="also time TRL's DPOTrainer on the same pairs")
    p.add_argument("--pack-tokens", type=int, default=256, help="row length of the packed arm (train.pack_tokens)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "dpo_length.yaml")
    frame = pd.read_parquet(cfg.data.paths["train"][0]).head(args.pairs)
    path = str(resolve_model(cfg.model.name))
    enc = PairEncoder(path, cfg.model.max_length, "chat")
    chosen, rejected = enc.encode(list(frame.prompt), list(frame.chosen)), enc.encode(list(frame.prompt), list(frame.rejected))
    pad = tokenizer_at(path).pad_token_id
    batch = pad_sequences(chosen.input_ids + rejected.input_ids, None, pad)
    packed_ids = chosen.input_ids + rejected.input_ids
    packed = pack_sequences(packed_ids, pad, args.pack_tokens)
    starts = torch.tensor(chosen.response_starts + rejected.response_starts)
    words = np.array([len(t.split()) for t in list(frame.chosen) + list(frame.rejected)], dtype=float)
    bins = torch.as_tensor(np.digitize(words, np.quantile(words, np.linspace(0, 1, 11)[1:-1])), dtype=torch.long)
    torch.manual_seed(0)
    model = load_policy_model(path, cfg.model.lora, pad)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with torch.no_grad(), model.disable_adapter():
        reference = sequence_logprobs(model, batch, starts)
    plain = PairLossSettings(mmd=MMDConfig(num_bins=10))
    causal = PairLossSettings(lam=0.1, variant="conditional", mmd=MMDConfig(num_bins=10))
    arms = {"dpo": ("dpo", plain, None, batch),
            "causal_dpo": ("causal_dpo", causal, None, batch),
            "dpo_precomputed": ("dpo", plain, reference, batch),
            "dpo_packed": ("dpo", plain, None, packed)}
    n = args.pairs

    wall: dict[str, list[float]] = {name: [] for name in arms}

    def step(name: str) -> float:
        t0, w0 = time.process_time(), time.perf_counter()
        loss_name, settings, ref, inputs = arms[name]
        rewards = implicit_reward(model, inputs, starts, cfg.loss.beta, ref)
        loss, _ = pair_loss(loss_name)(rewards[:n], rewards[n:], bins[:n], bins[n:], settings)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        wall[name].append(time.perf_counter() - w0)
        return time.process_time() - t0

    for name in arms:  # warm-up
        step(name)
        wall[name].clear()
    rounds: dict[str, list[float]] = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:
            rounds[name].append(step(name))
    median = {name: statistics.median(times) for name, times in rounds.items()}
    result = {
        "command": " ".join(["python", "benchmarks/bench_dpo.py", *sys.argv[1:]]),
        "machine": {"cpu": platform.processor() or platform.machine(), "nproc": os.cpu_count(), "threads": args.threads,
                    "torch": torch.__version__, "loadavg_at_start": os.getloadavg()[0]},
        "model": cfg.model.name, "pairs": n, "sequences": 2 * n, "tokens_per_sequence_max": int(batch["input_ids"].shape[1]),
        "cpu_seconds_per_step": rounds, "median": median,
        "causal_dpo_over_dpo": median["causal_dpo"] / median["dpo"],
        "reference_speedup": median["dpo"] / median["dpo_precomputed"],
        "packed_speedup": median["dpo"] / median["dpo_packed"],
        "padding_share": {"padded": 1 - sum(map(len, packed_ids)) / batch["input_ids"].numel(),
                          "packed": 1 - sum(map(len, packed_ids)) / packed.input_ids.numel()},
    }
    if args.trl:
        trl_steps = trl_seconds_per_step(path, frame, cfg, args.rounds)
        result.update(wall_seconds_per_step={"ours_dpo": wall["dpo"], "trl_dpo": trl_steps},
                      ours_over_trl_dpo=statistics.median(trl_steps) / statistics.median(wall["dpo"]))
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("median", "causal_dpo_over_dpo", "reference_speedup", "packed_speedup",
                                             "padding_share", "ours_over_trl_dpo") if k in result},
                     indent=2))


def trl_seconds_per_step(path: str, frame: pd.DataFrame, cfg, rounds: int) -> list[float]:
    """Wall seconds of each of TRL DPOTrainer's steps after one warm-up step, one batch of all `frame`'s pairs each."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            stamps.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            stamps.append(time.perf_counter())

    rows = [{"prompt": [{"role": "user", "content": r.prompt}], "chosen": [{"role": "assistant", "content": r.chosen}],
             "rejected": [{"role": "assistant", "content": r.rejected}]} for r in frame.itertuples()]
    steps = rounds + 1
    data = Dataset.from_list(rows * steps)
    lora = cfg.model.lora
    args = DPOConfig(output_dir=str(ROOT / "outputs" / "bench_dpo_trl"), per_device_train_batch_size=len(rows),
                     max_steps=steps, learning_rate=1e-5, beta=cfg.loss.beta, bf16=False, max_length=cfg.model.max_length,
                     report_to=[], logging_steps=10**6, save_strategy="no", dataloader_num_workers=0, use_cpu=True)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(path), args=args, train_dataset=data,
                         processing_class=tok, callbacks=[Clock()],
                         peft_config=LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    trainer.train()
    return [end - begin for begin, end in zip(stamps[2::2], stamps[3::2])]


if __name__ == "__main__":
    main()
