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
import torch.nn.functional as F

from ray_crm.assets import resolve_model


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
    test = pd.read_parquet(f"{args.dir}/{args.bench}/test.parquet")

    def score(rows: pd.DataFrame, side: str) -> torch.Tensor:
        enc = tok(list(rows.prompt), list(rows[side]), truncation=args.truncation, max_length=args.max_length, padding=True,
                  return_tensors="pt")
        return model(**enc).logits.squeeze(-1)

    @torch.no_grad()
    def clean_accuracy() -> float:
        model.eval()
        batches = (test.iloc[i:i + 50] for i in range(0, len(test), 50))
        hits = [(score(b, "chosen") > score(b, "rejected")).float() for b in batches]
        model.train()
        return torch.cat(hits).mean().item()

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = train.iloc[rng.integers(0, len(train), 16)]
        loss = -F.logsigmoid(score(batch, "chosen") - score(batch, "rejected")).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % args.eval_every == 0 or step == args.steps:
            print(f"{args.bench} lora_rank={args.lora_rank} lr={args.lr:g} step {step}: train loss {loss.item():.3f}, "
                  f"clean test accuracy {clean_accuracy():.3f}, {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
