"""The second paper's claim on real text: gradient regularization against KL, reference resets and no
regularizer, gold-scored by a learned reward model, GR's strength chosen by Ray Tune on validation prompts.

    make demo && python benchmarks/gold_rm.py      # the proxy RMs (demo) and the gold RM this needs
    python benchmarks/gr_vs_kl.py --phase tune      # GR gamma by Tune on validation prompts (seed 0)
    python benchmarks/gr_vs_kl.py --phase arms      # every arm x --seeds, reported on test prompts
    python benchmarks/gr_vs_kl.py --phase report    # -> the result JSON and plot (RESULT, below)

The report is made from the runs' logs, which it first copies from `outputs/` to
`benchmarks/results/gr_vs_kl_runs/` (committed, a few KB a run): it can be remade without the runs' folders.

Every run is `ray-crm train-rl` with `configs/rl_length.yaml` (SmolLM2-135M + LoRA, Dr.GRPO, the VADER task's
four training prompts) for `--steps` steps of `--prompts-per-step` prompts x 8 samples (16 x 16 by default, the
size of the demo's runs, which show the length drift: a GR step then takes ~31 s on the 2-core box, a run ~10
minutes with its two held-out evaluations), against the demo's length-biased RM (the proxy) or its causal RM
(`crm_*` arms), with two gold scorers that are never trained on: the gold RM of `configs/gold_rm.yaml` (another
backbone, clean pairs, off-topic praise loses) and the VADER lexicon. Held-out prompts
(`benchmarks/data/rl_validation_prompts.csv`, `benchmarks/data/rl_test_prompts.csv`, other topics than the training prompts) are sampled at
step 0 and at the end (`rl.eval_prompts`): Tune chooses gamma by the gold RM's score on the validation prompts;
the arms report on the test prompts. Each phase is one or more Ray Tune experiments (`ray-crm sweep`,
`sweep.stage=train-rl`): rerunning a phase resumes it, finished trials are not trained again. Seeds are the
rollout seeds (`rollout.seed`; the LoRA adapter starts at the base policy whatever `rl.seed`).

Arms: `none`; `kl_<beta>` (k3 KL to the initial policy); `reset_<period>` (KL to a reference renewed every
period steps); `gr_<gamma>` (gamma from the tune phase, or `--gamma`, and any `--extra-gammas`); `crm_none` and
`crm_gr_<gamma>` (the causal RM as proxy, the chosen gamma). Report per arm: the seeds' final held-out gold and
proxy scores (mean, standard error, and for the gold RM a 95% t interval), KL to the initial policy and response
length; held-out gold differences paired by seed (each arm's gain over its initial policy, each GR arm against
the other arms of its proxy) with 95% t intervals; and curves (proxy and gold against step, gold against KL: the
training rollouts' scores, measured every step).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "benchmarks" / "data"
RESULT = "gr_vs_kl"  # benchmarks/results/<RESULT>.json and docs/img/<RESULT>.png, written by --phase report
TRAINING_PROMPTS = 4  # the VADER task's
GOLD = "eval/gold_gold_rm_mean"  # the held-out gold RM score, the headline
COLUMNS = {"gold_final": GOLD, "lexicon_final": "eval/gold_vader_mean", "proxy_final": "eval/reward_mean",
           "kl_final": "policy/kl_to_initial", "tokens_final": "eval/response_tokens_mean",
           "eos_final": "eval/finished_fraction"}
RUN_LOGS = ROOT / "benchmarks" / "results" / f"{RESULT}_runs"  # the kept logs: these columns of each run's rl.csv
PLOTTED = ["reward_mean", "gold_gold_rm_mean", "response_tokens_mean", "policy/kl_to_initial"]
LOGGED = ["step", *PLOTTED, *(c for c in COLUMNS.values() if c not in PLOTTED)]
# (name, column, row): every final figure, and for the held-out ones the initial policy's (step 0) beside it
FIGURES = [(key, column, -1) for key, column in COLUMNS.items()] + [
    (key.replace("final", "initial"), column, 0) for key, column in COLUMNS.items() if column.startswith("eval/")]


def exported(pattern: str, hint: str) -> str:
    """The newest export matching `pattern`."""
    found = list(ROOT.glob(pattern))
    if not found:
        sys.exit(f"nothing matches {pattern}: {hint}")
    return str(max(found, key=lambda p: p.stat().st_mtime))


def gold_model() -> str:
    """The gold RM that `benchmarks/gold_rm.py` measured (its result names the export)."""
    result = ROOT / "benchmarks" / "results" / "gold_rm.json"
    model = json.loads(result.read_text())["model"] if result.is_file() else ""
    if not Path(model).is_dir():
        sys.exit(f"no gold RM export at {model!r} (from {result}): run `python benchmarks/gold_rm.py` first")
    return model


def base_overrides(args: argparse.Namespace, proxy: str, prompts: str) -> list[str]:
    gold = gold_model()
    return [f"output_dir={ROOT / 'outputs'}", f"reward.model={proxy}", f"rl.steps={args.steps}",
            f"rl.prompts_per_step={args.prompts_per_step}",
            f"reward.gold=[{{name: vader, kind: vader}}, {{name: gold_rm, kind: reward_model, model: {gold}}}]",
            "reward.cpus_per_actor=0.15",  # proxy + two gold scorers, engine and learner within the 2 CPUs
            f"rl.eval_prompts=[{DATA / prompts}]", f"rl.eval_samples={args.eval_samples}",
            "sweep.stage=train-rl", f"sweep.metric={GOLD}", "sweep.bias_metric=response_tokens_mean"]


def arms(args: argparse.Namespace, gamma: float) -> dict[str, tuple[str, list[str]]]:
    """Arm name -> (which demo RM is the proxy, its overrides), in the order they run."""
    out = {"none": ("bt", ["rl.regularizer=none"])}
    out |= {f"gr_{g:g}": ("bt", ["rl.regularizer=gr", f"rl.gr_gamma={g}"]) for g in [gamma, *args.extra_gammas]}
    out |= {f"kl_{b:g}": ("bt", ["rl.regularizer=kl", f"rl.kl_beta={b}"]) for b in args.betas}
    out |= {f"reset_{p}": ("bt", ["rl.regularizer=reset", f"rl.kl_beta={args.betas[0]}", f"rl.reset_every={p}"])
            for p in args.periods}
    out["crm_none"] = ("crm", ["rl.regularizer=none"])
    out[f"crm_gr_{gamma:g}"] = ("crm", ["rl.regularizer=gr", f"rl.gr_gamma={gamma}"])
    return out


def sweep(name: str, overrides: list[str], space: str):
    from ray_crm.config import load_config
    from ray_crm.tune.sweep import run_sweep

    cfg = load_config(ROOT / "configs" / "rl_length.yaml", [f"name={name}", *overrides, f"sweep.space={space}"])
    resume = (cfg.stage_dir("sweep") / "tune" / name).exists()
    return run_sweep(cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"resume": resume})}))


def chosen_gamma(prefix: str) -> float:
    summary = ROOT / "outputs" / f"{prefix}_tune" / "sweep" / "best.yaml"
    if not summary.is_file():
        sys.exit(f"no {summary}: run --phase tune first, or give --gamma")
    import yaml

    return float(yaml.safe_load(summary.read_text())["rl"]["gr_gamma"])


def keep_logs(prefix: str, arm: str) -> None:
    """Copy the plotted and reported columns of every finished trial of an arm (a few KB each) to
    `benchmarks/results/<RESULT>_runs/<arm>_seed<rollout seed>.csv`, which the report is made from: the runs'
    output folders are not kept, the committed logs are."""
    import yaml

    for log in sorted((ROOT / "outputs").glob(f"{prefix}_{arm}-*/train-rl/rl.csv")):
        if (log.parent / "summary.json").is_file():
            seed = yaml.safe_load((log.parent / "config.yaml").read_text())["rollout"]["seed"]
            frame = pd.read_csv(log)
            RUN_LOGS.mkdir(parents=True, exist_ok=True)
            target = RUN_LOGS / f"{arm}_seed{seed}.csv"
            frame[[c for c in LOGGED if c in frame.columns]].to_csv(target.with_suffix(".tmp"), index=False)
            target.with_suffix(".tmp").replace(target)


def runs(arm: str) -> list[tuple[int, pd.DataFrame]]:
    """(rollout seed, kept log) of every kept run of an arm."""
    found = [(int(log.stem.rsplit("_seed", 1)[1]), pd.read_csv(log)) for log in RUN_LOGS.glob(f"{arm}_seed*.csv")]
    return sorted(found, key=lambda x: x[0])


def summarize(per_seed: list[tuple[int, pd.DataFrame]]) -> dict:
    """Per arm: the seeds, and each final figure's per-seed values, mean and standard error."""
    out: dict = {"seeds": [s for s, _ in per_seed]}
    for name, column, row in FIGURES:
        values = []
        for _, log in per_seed:
            filled = log[column].dropna() if column in log.columns else pd.Series(dtype=float)
            values.append(float(filled.iloc[row]) if len(filled) else math.nan)
        out[f"{name}_values"] = values
        out[f"{name}_mean"] = statistics.fmean(values) if values else math.nan
        out[f"{name}_se"] = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return out


def t_interval(values: list[float]) -> list[float]:
    """The 95% t interval of the mean of `values` (NaN bounds below two values)."""
    from scipy import stats

    if len(values) < 2:
        return [math.nan, math.nan]
    mean, half = statistics.fmean(values), float(stats.t.ppf(0.975, len(values) - 1)) * statistics.stdev(values)
    return [mean - half / math.sqrt(len(values)), mean + half / math.sqrt(len(values))]


def contrasts(arms: dict[str, dict]) -> dict[str, dict]:
    """Held-out gold RM differences between arms, paired by rollout seed (a seed's arms start from the same
    initial-policy samples): each GR arm against every other arm of its proxy, and each arm's gain over its
    initial policy. Each with the per-seed values, mean and 95% t interval."""
    def paired(a: dict, b: dict | None) -> dict:
        seeds = [s for s in a["seeds"] if b is None or s in b["seeds"]]
        minus = (dict(zip(a["seeds"], a["gold_initial_values"], strict=True)) if b is None
                 else dict(zip(b["seeds"], b["gold_final_values"], strict=True)))
        mine = dict(zip(a["seeds"], a["gold_final_values"], strict=True))
        values = [mine[s] - minus[s] for s in seeds]
        return {"seeds": seeds, "gold_diff_values": values, "gold_diff_mean": statistics.fmean(values) if values
                else math.nan, "gold_diff_ci95": t_interval(values)}

    out = {f"{arm} - initial": paired(r, None) for arm, r in arms.items()}
    grs = [a for a in arms if a.startswith(("gr_", "crm_gr_"))]
    for gr in grs:
        for other, summary in arms.items():
            if other in grs[:grs.index(gr) + 1] or other.startswith("crm_") != gr.startswith("crm_"):
                continue  # itself, a GR arm already compared with it, or another proxy
            out[f"{gr} - {other}"] = paired(arms[gr], summary)
    return out


def plot(curves: dict[str, list[tuple[int, pd.DataFrame]]], window: int, path: Path) -> None:
    """Training-rollout figures as means over `window` steps (the steps that cover every training prompt once:
    the gold RM's scale differs by prompt), and the held-out gold of each seed's final policy against its KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for i, (arm, per_seed) in enumerate(curves.items()):
        color = f"C{i % 10}"
        for j, (_, log) in enumerate(per_seed):
            steps = log.dropna(subset=["reward_mean"]).set_index("step")
            smooth = steps[PLOTTED]
            smooth = smooth.rolling(window).mean().dropna()
            axes[0].plot(smooth.index, smooth["reward_mean"], color=color, alpha=0.7, label=arm if j == 0 else None)
            axes[1].plot(smooth.index, smooth["gold_gold_rm_mean"], color=color, alpha=0.7)
            axes[2].plot(smooth.index, smooth["response_tokens_mean"], color=color, alpha=0.7)
            axes[3].plot(smooth["policy/kl_to_initial"], smooth["gold_gold_rm_mean"], color=color, alpha=0.5)
            final = log.dropna(subset=[GOLD]).iloc[-1]
            axes[3].scatter(log["policy/kl_to_initial"].dropna().iloc[-1], final[GOLD], color=color, marker="*", s=90)
    titles = (f"proxy reward (training prompts, {window}-step mean)", "gold RM (training prompts)", "response tokens",
              "gold RM vs KL to the initial policy (star: held-out, final)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step" if "vs KL" not in title else "KL (k3, per token)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["tune", "arms", "report"], required=True)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompts-per-step", type=int, default=2, help="each sampled rollout.n_samples=8 times")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.1, 1.0, 10.0], help="tune: the GR grid")
    parser.add_argument("--gamma", type=float, help="arms: GR's gamma (default: the tune phase's choice)")
    parser.add_argument("--extra-gammas", type=float, nargs="*", default=[],
                        help="more `gr_<gamma>` arms beside the chosen one (for example one aimed at a KL arm's KL)")
    parser.add_argument("--betas", type=float, nargs="+", default=[0.05, 0.2], help="KL arms' rl.kl_beta")
    parser.add_argument("--periods", type=int, nargs="+", default=[5, 10], help="reset arms' rl.reset_every")
    parser.add_argument("--eval-samples", type=int, default=16,
                        help="samples per held-out prompt: the held-out means rank the arms, so they must not be "
                             "noisier than the arms differ (16-sample means of the training rollouts swing by ~1 gold "
                             "RM unit from step to step)")
    parser.add_argument("--arms", nargs="+", help="arms: run only these (names as in the report); default all")
    parser.add_argument("--prefix", default="gvk")
    args = parser.parse_args()
    if args.phase != "report":
        proxies = {kind: exported(f"outputs/demo/train-rm/demo-{kind}-*/export", "run `make demo` first")
                   for kind in ("bt", "crm")}
    if args.phase == "tune":
        grid = ", ".join(f"{g:g}" for g in args.gammas)
        summary = sweep(f"{args.prefix}_tune", [*base_overrides(args, proxies["bt"], "rl_validation_prompts.csv"),
                                                "rl.regularizer=gr"], f"{{rl.gr_gamma: {{grid: [{grid}]}}}}")
        print("chosen on validation prompts:", summary["chosen"])
        return
    gamma = args.gamma if args.gamma is not None else chosen_gamma(args.prefix)
    chosen = arms(args, gamma)
    unknown = set(args.arms or ()) - set(chosen)
    if unknown:
        sys.exit(f"unknown arms {sorted(unknown)}; the arms are {list(chosen)}")
    if args.phase == "arms":
        seeds = ", ".join(map(str, args.seeds))
        for arm, (kind, overrides) in chosen.items():
            if args.arms and arm not in args.arms:
                continue
            print(f"== {arm}", flush=True)
            sweep(f"{args.prefix}_{arm}", [*base_overrides(args, proxies[kind], "rl_test_prompts.csv"), *overrides],
                  f"{{rollout.seed: {{grid: [{seeds}]}}}}")
        return
    for arm in chosen:
        keep_logs(args.prefix, arm)
    curves = {arm: runs(arm) for arm in chosen}
    out = ROOT / "benchmarks" / "results" / f"{RESULT}.json"
    previous = json.loads(out.read_text())["arms"] if out.is_file() else {}
    carried = [arm for arm, per_seed in curves.items() if not per_seed and arm in previous]
    result = {"command": "python benchmarks/gr_vs_kl.py " + " ".join(sys.argv[1:]), "steps": args.steps,
              "gamma": gamma, "extra_gammas": args.extra_gammas, "gold": "held-out test prompts, gold RM (configs/gold_rm.yaml); lexicon beside",
              "arms": {arm: summarize(per_seed) if per_seed else previous[arm] for arm, per_seed in curves.items()
                       if per_seed or arm in carried},
              "arms_not_run": [arm for arm, per_seed in curves.items()
                               if len(per_seed) < len(args.seeds) and arm not in carried],
              "carried_without_logs": carried}
    for r in result["arms"].values():
        r["gold_final_ci95"] = t_interval(r["gold_final_values"])
    result["contrasts"] = contrasts(result["arms"])
    out.write_text(json.dumps(result, indent=2) + "\n")
    window = math.ceil(TRAINING_PROMPTS / args.prompts_per_step)
    if any(curves.values()):
        plot({a: c for a, c in curves.items() if c}, window, ROOT / "docs" / "img" / f"{RESULT}.png")
    print("| arm | seeds | held-out gold RM | lexicon | proxy | KL | tokens |\n|---|---|---|---|---|---|---|")
    for arm, r in result["arms"].items():
        print(f"| {arm} | {len(r['seeds'])} | {r['gold_final_mean']:.3f} +- {r['gold_final_se']:.3f} | "
              f"{r['lexicon_final_mean']:.3f} | {r['proxy_final_mean']:.3f} | {r['kl_final_mean']:.4f} | "
              f"{r['tokens_final_mean']:.1f} |")
    print("\n| held-out gold RM, paired by seed | mean | 95% interval |\n|---|---|---|")
    for name, c in result["contrasts"].items():
        print(f"| {name} | {c['gold_diff_mean']:+.3f} | [{c['gold_diff_ci95'][0]:+.3f}, {c['gold_diff_ci95'][1]:+.3f}] |")


if __name__ == "__main__":
    main()
