"""Speed of the batched MMD penalty (issue #4) against the seed's double loop, and its share of an RM step.

    python benchmarks/bench_mmd.py            # writes benchmarks/results/mmd.json, prints Markdown tables

One thread throughout. B is the number of preference pairs; the unconditional penalty sees N = 2B rewards.
Times are of forward + backward, in CPU time of this process (`time.process_time`): on a shared machine other
tenants stretch wall time, not the CPU time spent; each is the best of several interleaved rounds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from ray_crm.config import Config
from ray_crm.losses import MMDConfig, binned_mmd_penalty, bradley_terry_loss, crm_loss, z_dependence
from ray_crm.train.rm_trainer import mmd_settings

torch.set_num_threads(1)
RESULTS = Path(__file__).parent / "results" / "mmd.json"


def seed_penalty(rewards: torch.Tensor, bins: torch.Tensor, num_bins: int, sigma: float = 1.0) -> torch.Tensor:
    """The seed's code (causal_reward_models.txt): a Python double loop over bin pairs, one MMD per pair.

    Only change: bins with < 2 samples are skipped (as the library does), so that both sides compute the same number.
    """

    def rbf(a, b):
        diff = a.unsqueeze(1) - b.unsqueeze(0)
        return torch.exp(-diff.pow(2).sum(-1) / (2 * sigma**2))

    def mmd(x, y):
        return rbf(x, x).mean() + rbf(y, y).mean() - 2 * rbf(x, y).mean()

    per_bin = {b: rewards[bins == b] for b in range(num_bins)}
    total, count = 0.0, 0
    for i in range(num_bins):
        for j in range(i + 1, num_bins):
            if len(per_bin[i]) > 1 and len(per_bin[j]) > 1:
                total = total + mmd(per_bin[i].unsqueeze(-1), per_bin[j].unsqueeze(-1))
                count += 1
    return total / count


def backward(fn: Callable, *args) -> None:
    out = fn(*args)
    (out[0] if isinstance(out, tuple) else out).backward()


def best_time(fns: dict[str, Callable[[], None]], rounds: int, min_seconds: float) -> dict[str, float]:
    """Seconds per call of each fn: the best of `rounds` interleaved rounds of >= min_seconds each."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            fn()  # warm-up
            calls, start = 0, time.process_time()
            while (elapsed := time.process_time() - start) < min_seconds or calls < 2:
                fn()
                calls += 1
            best[name] = min(best[name], elapsed / calls)
    return best


def penalty_table(sizes: list[int], bins_list: list[int], rounds: int) -> list[dict]:
    rows = []
    for b in sizes:
        for m in bins_list:
            g = torch.Generator().manual_seed(b * 1000 + m)
            rewards = torch.randn(2 * b, generator=g).requires_grad_(True)
            bins = torch.randint(0, m, (2 * b,), generator=g)
            fixed = MMDConfig(bandwidth=1.0, reduction="mean", num_bins=m)  # the seed's kernel and averaging
            median = MMDConfig(num_bins=m)  # median bandwidth, sum over pairs
            production = mmd_settings(Config(), m)  # what train-rm runs by default: standardized, RBF mixture
            by_value = dataclasses.replace(production, z_kernel="rbf")  # HSIC against Z's values: no bins
            z = torch.rand(2 * b, generator=g) * 60
            ours = binned_mmd_penalty(rewards, bins, fixed)[0]
            torch.testing.assert_close(ours, seed_penalty(rewards, bins, m), rtol=1e-4, atol=1e-6)
            t = best_time(
                {
                    "seed": partial(backward, seed_penalty, rewards, bins, m),
                    "ours": partial(backward, binned_mmd_penalty, rewards, bins, fixed),
                    "ours_median": partial(backward, binned_mmd_penalty, rewards, bins, median),
                    "ours_production": partial(backward, binned_mmd_penalty, rewards, bins, production),
                    "ours_production_rbf": partial(backward, z_dependence, rewards, z, by_value),
                },
                rounds=rounds,
                min_seconds=0.05 if b * m < 10_000 else 0.02,
            )
            row = {"B": b, "N": 2 * b, "M": m, **{f"{k}_ms": v * 1e3 for k, v in t.items()}}
            row["speedup"] = t["seed"] / t["ours"]
            rows.append(row)
            print(
                f"B={b:5d} M={m:3d}  seed {row['seed_ms']:9.2f} ms  ours {row['ours_ms']:7.3f} ms  "
                f"x{row['speedup']:7.1f}",
                file=sys.stderr,
            )
    return rows


def step_share(steps: int) -> dict:
    """A full LoRA reward-model step on a tiny BERT, with and without the penalty (M=10, train-rm's default
    kernel: standardized rewards, RBF mixture)."""
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    pairs, seq_len, num_bins = 32, 64, 10
    config = BertConfig(
        vocab_size=1000,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=seq_len,
        num_labels=1,
    )
    torch.manual_seed(0)
    model = get_peft_model(
        BertForSequenceClassification(config),
        LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"]),
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (2 * pairs, seq_len))
    bins = torch.randint(0, num_bins, (2, pairs))
    mmd = mmd_settings(Config(), num_bins)
    by_value = dataclasses.replace(mmd, z_kernel="rbf")
    z = torch.randint(5, 60, (2, pairs)).double()  # lengths in tokens

    def step(with_penalty: bool) -> None:
        rewards = model(input_ids=tokens).logits.squeeze(-1)
        chosen, rejected = rewards[:pairs], rewards[pairs:]
        if with_penalty:
            loss, _ = crm_loss(chosen, rejected, bins[0], bins[1], 1.0, "unconditional", mmd)
        else:
            loss, _ = bradley_terry_loss(chosen, rejected)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    rewards = torch.randn(2 * pairs, requires_grad=True)
    flat_bins = bins.flatten()
    times = {"with": [], "without": [], "penalty": [], "penalty_rbf": []}
    for _ in range(steps):  # interleaved, so that both see the same load
        for name, fn in (
            ("with", partial(step, True)),
            ("without", partial(step, False)),
            ("penalty", partial(backward, binned_mmd_penalty, rewards, flat_bins, mmd)),
            ("penalty_rbf", partial(backward, z_dependence, rewards, z.flatten(), by_value)),
        ):
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    med = {k: statistics.median(v[2:]) for k, v in times.items()}  # first steps: warm-up
    return {
        "model": "BERT hidden 64, 2 layers, vocab 1000, LoRA r=8 on query/value",
        "kernel": {"bandwidth": list(mmd.bandwidth), "standardize": mmd.standardize, "reduction": mmd.reduction},
        "pairs": pairs,
        "seq_len": seq_len,
        "num_bins": num_bins,
        "steps": steps,
        "step_ms_with_penalty": med["with"] * 1e3,
        "step_ms_without_penalty": med["without"] * 1e3,
        "penalty_fwd_bwd_ms": med["penalty"] * 1e3,
        "penalty_share_of_step": med["penalty"] / med["with"],
        "penalty_rbf_fwd_bwd_ms": med["penalty_rbf"] * 1e3,  # z_kernel=rbf, the unconditional batch of 2 x 32
        "penalty_rbf_share_of_step": med["penalty_rbf"] / med["with"],
        "share_from_step_difference": (med["with"] - med["without"]) / med["with"],
    }


def machine() -> dict:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "arch": platform.machine(),
        "cpu": cpu,
        "nproc": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg()[0],
    }


def markdown(rows: list[dict], step: dict) -> str:
    lines = [
        ("| B pairs | N rewards | M bins | seed loop (ms) | batched (ms) | speedup | batched, median bw (ms) "
         "| batched, production kernel (ms) | production kernel, z_kernel=rbf (ms) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['B']} | {r['N']} | {r['M']} | {r['seed_ms']:.2f} | {r['ours_ms']:.3f} | {r['speedup']:.0f}x "
        f"| {r['ours_median_ms']:.3f} | {r['ours_production_ms']:.3f} | {r['ours_production_rbf_ms']:.3f} |"
        for r in rows
    ]
    lines += [
        "",
        "| RM step (tiny BERT + LoRA, 32 pairs, M=10) | ms |",
        "|---|---:|",
        f"| step with CRM penalty | {step['step_ms_with_penalty']:.1f} |",
        f"| step with plain BT | {step['step_ms_without_penalty']:.1f} |",
        f"| penalty forward + backward | {step['penalty_fwd_bwd_ms']:.2f} |",
        f"| penalty share of step | {100 * step['penalty_share_of_step']:.1f}% |",
        f"| penalty with z_kernel=rbf, forward + backward | {step['penalty_rbf_fwd_bwd_ms']:.2f} |",
        f"| its share of the step | {100 * step['penalty_rbf_share_of_step']:.1f}% |",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    parser.add_argument("--bins", type=int, nargs="+", default=[2, 10, 30, 60])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    info = machine()
    rows = penalty_table(args.sizes, args.bins, args.rounds)
    step = step_share(args.steps)
    target = next((r["speedup"] for r in rows if r["B"] == 256 and r["M"] == 30), None)
    info["loadavg_at_end"] = os.getloadavg()[0]
    result = {
        "command": " ".join(["python benchmarks/bench_mmd.py", *sys.argv[1:]]),
        "machine": info,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
        "speedup_b256_m30": target,
        "penalty_share_of_step": step["penalty_share_of_step"],
        "penalty_rbf_share_of_step": step["penalty_rbf_share_of_step"],
        "step": step,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(rows, step))


if __name__ == "__main__":
    main()
