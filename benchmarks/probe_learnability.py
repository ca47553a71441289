"""Can a backbone learn a benchmark's task in N steps? A plain single-process Bradley-Terry loop (no Ray, no
MMD), clean test accuracy every 100 steps - to choose steps, lr and LoRA-or-full before spending a sweep.

    ray-crm bench --config configs/bench_length.yaml      # the benchmark's files under outputs/bench/
    python benchmarks/probe_learnability.py --bench length --lora-rank 16 --lr 5e-4 --steps 100
    # what is learnable at all: the same sycophancy pairs with the phrase removed from every response
    python benchmarks/probe_learnability.py --bench sycophancy --strip "Yes, you are right." --steps 300

Pairs are tokenized as text pairs (prompt, response) at --max-length with --truncation, batches of 16 drawn
with replacement.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from ray_crm.assets import resolve_model
from ray_crm.eval.summaries import SUMMARIES
from ray_crm.losses import MMDConfig, crm_loss


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bench", required=True, choices=["sycophancy", "concept", "length", "demographic"])
    parser.add_argument("--dir", default="outputs/bench")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--lora-rank", type=int, default=0, help="0: full fine-tune")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--truncation", default="longest_first", choices=["longest_first", "only_first", "only_second"])
    parser.add_argument("--strip", default="", help="a phrase removed from every train response (the clean ceiling)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--split", default="validation", choices=["validation", "test"], help="the probes scored")
    parser.add_argument("--lam", type=float, default=0.0, help="> 0: the causal loss, Z = --z-phrase in the response")
    parser.add_argument("--z-phrase", default="Yes, you are right.")
    parser.add_argument("--variant", default="conditional", choices=["conditional", "unconditional"])
    parser.add_argument("--unbiased", action="store_true", help="the U-statistic MMD estimator")
    parser.add_argument("--raw", action="store_true", help="MMD of the raw rewards (not standardized)")
    args = parser.parse_args()

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1)
    if args.lora_rank:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank, task_type="SEQ_CLS"))
    train = pd.read_parquet(f"{args.dir}/{args.bench}/train.parquet")
    if args.strip:
        for side in ("chosen", "rejected"):
            train[side] = train[side].str.replace(args.strip, "", regex=False).str.strip()

    def score(rows: pd.DataFrame, side: str) -> torch.Tensor:
        enc = tok(list(rows.prompt), list(rows[side]), truncation=args.truncation, max_length=args.max_length, padding=True,
                  return_tensors="pt")
        return model(**enc).logits.squeeze(-1)

    # settings are chosen on the validation twins; --split test reports the test probes
    probes = pd.read_parquet(f"{args.dir}/{args.bench}/{'validation_' if args.split == 'validation' else ''}probes.parquet")

    @torch.no_grad()
    def test_summary() -> str:
        """The benchmark's own test summary (accuracy and bias, as `ray-crm eval` computes them)."""
        model.eval()
        rewards = [score(probes.iloc[i:i + 64].rename(columns={"response": "r"}), "r") for i in range(0, len(probes), 64)]
        model.train()
        summary = SUMMARIES[args.bench](probes.assign(reward=torch.cat(rewards).numpy()), 8)
        return ", ".join(f"{k} {v:.3g}" for k, v in summary.items() if isinstance(v, float))

    mmd = MMDConfig(bandwidth=(0.5, 1.0, 2.0, 4.0), unbiased=args.unbiased, standardize=not args.raw, num_bins=2)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train.iloc[rng.integers(0, len(train), 16)]
        chosen, rejected = score(batch, "chosen"), score(batch, "rejected")
        z = [torch.as_tensor(batch[side].str.contains(args.z_phrase, regex=False).to_numpy()).long()
             for side in ("chosen", "rejected")]
        loss, _ = crm_loss(chosen, rejected, *z, args.lam, args.variant, mmd)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"{args.bench} lora_rank={args.lora_rank} lr={args.lr:g} lam={args.lam:g} {args.variant} "
                  f"unbiased={args.unbiased} raw={args.raw} step {step}: train loss {loss.item():.3f}; {args.split}: "
                  f"{test_summary()}; {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
