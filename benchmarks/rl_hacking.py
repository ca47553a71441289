"""Reward hacking in GRPO: a length-biased RM vs a causal RM, and GR vs KL vs no regularizer (docs/RESULTS.md).

    make demo      # trains the two reward models this needs (outputs/demo/train-rm/*/export)
    python benchmarks/rl_hacking.py [--steps 20]
    python benchmarks/rl_hacking.py --seed 1 --arms vanilla_none crm_none     # another seed of two arms

Runs `ray-crm train-rl --config configs/rl_length.yaml` once per arm, one after another (SmolLM2-135M + LoRA,
4 VADER prompts x 8 samples x 48 tokens a step, VADER lexicon as the gold scorer), then writes
`benchmarks/results/rl_hacking.json`, a Markdown table and `docs/img/rl_hacking.png` (response length and gold
score per step). A finished arm is not trained again (train-rl resumes it from its last checkpoint), so rerunning
only re-reads the logs. The arms:
- `vanilla_none`: the Bradley-Terry RM (it prefers longer answers), no regularizer;
- `vanilla_gr<gamma>`: the same RM, gradient regularization, one arm per `--gammas` value;
- `vanilla_kl`: the same RM, KL to the initial policy (`rl.kl_beta`);
- `crm_none`: the conditional causal RM (length bins), no regularizer.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def arms(gammas: list[float], beta: float) -> dict[str, tuple[str, list[str]]]:
    """Arm name -> (the demo RM it trains against, its overrides)."""
    return {
        "vanilla_none": ("bt", ["rl.regularizer=none"]),
        **{f"vanilla_gr{g:g}": ("bt", ["rl.regularizer=gr", f"rl.gr_gamma={g}"]) for g in gammas},
        "vanilla_kl": ("bt", ["rl.regularizer=kl", f"rl.kl_beta={beta}"]),
        "crm_none": ("crm", ["rl.regularizer=none"]),
    }
COLUMNS = ("reward_mean", "gold_vader_mean", "response_tokens_mean", "finished_fraction")


def exported(kind: str) -> str:
    """The demo's exported RM of this kind (bt: vanilla; crm: the causal one)."""
    found = sorted((ROOT / "outputs" / "demo" / "train-rm").glob(f"demo-{kind}-*/export"))
    if not found:
        sys.exit(f"no demo-{kind}-* reward model under outputs/demo/train-rm: run `make demo` first")
    return str(found[-1])


def window(rows: list[dict[str, str]], key: str, first: bool, k: int = 3) -> float:
    part = rows[:k] if first else rows[-k:]
    return sum(float(r[key]) for r in part) / len(part)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 10.0], help="rl.gr_gamma of the GR arms")
    parser.add_argument("--beta", type=float, default=0.05, help="rl.kl_beta of vanilla_kl")
    parser.add_argument("--prefix", default="rlh")
    parser.add_argument("--seed", type=int, default=0, help="rollout.seed and rl.seed (0: the arms' default runs)")
    parser.add_argument("--arms", nargs="+", help="run only these arms")
    args = parser.parse_args()
    prefix = args.prefix if args.seed == 0 else f"{args.prefix}_seed{args.seed}"

    from ray_crm.config import load_config
    from ray_crm.stages import run_stage

    logs = {}
    chosen = {a: v for a, v in arms(args.gammas, args.beta).items() if not args.arms or a in args.arms}
    for arm, (kind, overrides) in chosen.items():
        cfg = load_config(ROOT / "configs" / "rl_length.yaml", [
            f"name={prefix}_{arm}", f"output_dir={ROOT / 'outputs'}", f"reward.model={exported(kind)}",
            f"rl.steps={args.steps}", f"rollout.seed={args.seed}", f"rl.seed={args.seed}", *overrides])
        print(f"== {arm}", flush=True)
        logs[arm] = Path(run_stage("train-rl", cfg)["metrics"])

    table, curves = {}, {}
    for arm, path in logs.items():
        with open(path) as fh:
            rows = list(csv.DictReader(fh))
        curves[arm] = rows
        table[arm] = {f"{key}_{which}": window(rows, key, which == "first") for key in COLUMNS
                      for which in ("first", "last")}
    result = {"command": "python benchmarks/rl_hacking.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "seed": args.seed,
              "gammas": args.gammas, "beta": args.beta, "window": "mean of the first / last 3 steps", "arms": table}
    suffix = "" if args.seed == 0 else f"_seed{args.seed}"
    out = ROOT / "benchmarks" / "results" / f"rl_hacking{suffix}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| arm | RM reward | gold (VADER) | response tokens | finished (EOS) |", "|---|---:|---:|---:|---:|"]
    for arm, t in table.items():
        cells = [f"{t[f'{k}_first']:.3f} -> {t[f'{k}_last']:.3f}" for k in COLUMNS]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    plot(curves, ROOT / "docs" / "img" / f"rl_hacking{suffix}.png")


def plot(curves: dict[str, list[dict[str, str]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("reward_mean", "response_tokens_mean", "gold_vader_mean"),
                              ("trained RM reward", "response tokens (cap 48)", "gold: VADER sentiment"), strict=True):
        for arm, rows in curves.items():
            ax.plot([int(r["step"]) for r in rows], [float(r[key]) for r in rows], label=arm)
        ax.set_title(title)
        ax.set_xlabel("GRPO step")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
