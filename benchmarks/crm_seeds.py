"""Vanilla vs causal RM (or DPO vs Causal DPO) on one bias benchmark: lambda chosen on validation, every model
trained with several seeds, reported on test with mean +- standard error and a 95% interval on each cut.

    python benchmarks/crm_seeds.py --bench length          # -> benchmarks/results/crm_length.json (+ .md)
    python benchmarks/crm_seeds.py --bench sycophancy --lambdas 10 100 --seeds 0 1 2 --set train.lr=5e-4
    python benchmarks/crm_seeds.py --family dpo --bench length --lambdas 0.03 0.3   # -> results/cdpo_<bench>.json
    python benchmarks/crm_seeds.py --bench sycophancy --lambdas 1 --causal-set loss.balance=mirror --out ...

`--family dpo` trains policies with Causal DPO (`configs/dpo_<bench>.yaml`, `ray-crm train-dpo`; lambda 0 is plain
DPO step for step) and scores each by its implicit reward beta * log(pi / pi_ref), read as a reward model.

1. `ray-crm bench` and `prepare` with `configs/bench_<name>.yaml` (its data, model and training settings).
2. One Ray Tune experiment (`ray-crm sweep`, resumable) over loss.lambda_mmd x train.seed; lambda 0 is the vanilla
   Bradley-Terry RM (the causal loss at lambda 0 is BT bit for bit).
3. lambda is chosen on validation alone, from the per-lambda means over seeds: the lowest counterfactual
   invariance gap on the validation twins (`val_ci_gap_std`) among the lambdas within 2 points of the best
   Z-balanced validation accuracy (`val_balanced_accuracy`; the split's shortcut earns nothing there).
4. `ray-crm eval` scores every trained model on the test probes; the JSON keeps every model's figures, so the
   lambdas not chosen are reported too.

Bias figures are given in units of the model's reward spread across test inputs (`*_std`: a model cannot look
unbiased by shrinking its rewards) with the raw shift beside them. A cut is 1 - |bias_crm| / |bias_vanilla| per
seed (paired by seed); its interval is the t interval over seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
from scipy import stats

from ray_crm.config import ConfigError, load_config, validate
from ray_crm.stages import run_stage

ROOT = Path(__file__).resolve().parents[1]
# Per benchmark: the headline bias in reward-std units, then the figures reported beside it.
FIGURES = {
    "length": ("pad_shift_std", ["pad_shift", "spearman_length", "pad_win_rate", "ci_gap_std"]),
    "sycophancy": ("prefix_shift_std", ["prefix_shift", "sycophancy_rate", "sycophancy_rate_floor", "ci_gap_std"]),
    "concept": ("concept_margin_shift_std", ["concept_margin_shift", "bias_at_c", "ci_gap_std"]),
    "demographic": ("discrimination", ["ci_gap_std"]),
}
FAMILIES = {
    "rm": {"prefix": "crm", "config": "bench_{bench}.yaml", "loss": "crm", "stage": "train-rm"},
    "dpo": {"prefix": "cdpo", "config": "dpo_{bench}.yaml", "loss": "causal_dpo", "stage": "train-dpo"},
}
CUTS = {"length": ["pad_shift_std", "spearman_length"], "sycophancy": ["prefix_shift_std", "sycophancy_rate"],
        "concept": ["concept_margin_shift_std"], "demographic": ["discrimination"]}


def mean_se(values: list[float]) -> dict[str, float]:
    x = np.asarray(values, dtype=float)
    se = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else float("nan")
    return {"mean": float(x.mean()), "se": se}


def interval(values: list[float]) -> list[float]:
    """95% t interval of the mean."""
    x = np.asarray(values, dtype=float)
    if len(x) < 2:
        return [float("nan"), float("nan")]
    half = stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return [float(x.mean() - half), float(x.mean() + half)]


def choose_lambda(rows: list[dict], drop: float) -> float:
    """The validation rule of step 3, on per-lambda means over seeds."""
    by = {}
    for r in rows:
        by.setdefault(r["lambda"], []).append(r)
    means = {lam: {k: float(np.mean([r[k] for r in rs])) for k in ("val_balanced_accuracy", "val_ci_gap_std")}
             for lam, rs in by.items() if lam > 0}
    best = max(m["val_balanced_accuracy"] for m in means.values())
    ok = {lam: m for lam, m in means.items() if m["val_balanced_accuracy"] >= best - drop}
    return min(ok, key=lambda lam: ok[lam]["val_ci_gap_std"])


def same_training(card_config: dict, cfg) -> bool:
    """Whether a model card's run was trained as `cfg` trains, but for its lambda and seed (sweeps of other
    settings share the output folder). A card written before a setting existed reads as having its default."""
    try:
        card_config = validate(card_config, "model card").model_dump(mode="json")
    except ConfigError:
        return False
    want = cfg.model_dump(mode="json")
    for section in ("model", "train", "data"):
        a, b = dict(card_config.get(section, {})), dict(want[section])
        for drop in ("seed", "max_failures", "twins", "output_dir"):
            a.pop(drop, None)
            b.pop(drop, None)
        if a != b:
            return False
    return {k: v for k, v in card_config["loss"].items() if k != "lambda_mmd"} == \
        {k: v for k, v in want["loss"].items() if k != "lambda_mmd"}


def markdown(result: dict) -> str:
    """The table of a result file: every lambda's test figures as mean +- se over seeds, then the chosen one's cuts."""
    headline, beside = FIGURES[result["bench"]]
    keys = ["accuracy", headline, *beside, "reward_scale"]
    lines = [f"| lambda ({result['variant']}) | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    vanilla = "0 (DPO)" if result.get("family") == "dpo" else "0 (vanilla BT)"
    for lam, figures in result["per_lambda"].items():
        name = vanilla if float(lam) == 0 else lam + (" (chosen)" if float(lam) == result["chosen_lambda"] else "")
        lines.append(f"| {name} | " + " | ".join(f"{figures[k]['mean']:.3g} +- {figures[k]['se']:.2g}" for k in keys) + " |")
    lines.append("")
    for key, cut in result["cuts"].items():
        lo, hi = cut["ci95"]
        lines.append(f"- cut of |{key}| at lambda {result['chosen_lambda']:g}: {100 * cut['mean']:.1f}% "
                     f"(95% CI {100 * lo:.1f}% to {100 * hi:.1f}%; seeds: {', '.join(f'{100 * v:.1f}%' for v in cut['values'])})")
    if result.get("causal_overrides"):
        lines.append(f"- the lambda > 0 models trained with {', '.join(result['causal_overrides'])}; vanilla without")
    acc, spread = result["accuracy_change"], result["spread_ratio"]
    lines.append(f"- clean accuracy change: {acc['mean']:+.1f} points (95% CI {acc['ci95'][0]:+.1f} to {acc['ci95'][1]:+.1f})")
    lines.append(f"- reward spread, causal / vanilla: {spread['mean']:.2f} (seeds: {', '.join(f'{v:.2f}' for v in spread['values'])})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, choices=list(FIGURES))
    p.add_argument("--family", default="rm", choices=list(FAMILIES), help="reward models, or DPO-trained policies")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0, 10.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variant", default="conditional", choices=["conditional", "unconditional"])
    p.add_argument("--max-accuracy-drop", type=float, default=0.02)
    p.add_argument("--out", default=None, help="default: benchmarks/results/<crm|cdpo>_<bench>.json")
    p.add_argument("--render", action="store_true", help="only print the Markdown table of an existing result file")
    p.add_argument("--no-sweep", action="store_true", help="use the models the sweep has exported so far")
    p.add_argument("--validation-only", action="store_true",
                   help="report the exported models' validation figures alone (no test evaluation, no choice of "
                        "lambda): a pilot, written to <name>_validation.json")
    p.add_argument("--experiment", default="", metavar="SUFFIX",
                   help="name the sweeps crm_<bench>SUFFIX (each further suffixed by the lambdas it trains, as Tune "
                        "cannot grow a started grid); the report uses the models of every crm_<bench>* sweep "
                        "trained as this one")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a dotted config override for every model, e.g. --set train.lr=1e-4 (repeatable)")
    p.add_argument("--causal-set", dest="causal_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override for the lambda > 0 models only, e.g. --causal-set loss.balance=mirror: the "
                        "vanilla models stay plain (they are then trained by a sweep of their own)")
    args = p.parse_args()

    family = FAMILIES[args.family]
    name = f"{family['prefix']}_{args.bench}"
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{name}.json")
    if args.render:
        print(markdown(json.loads(out.read_text())))
        return
    config = ROOT / "configs" / family["config"].format(bench=args.bench)
    if not config.is_file():
        sys.exit(f"{config} does not exist: --family {args.family} has no config for the {args.bench} benchmark")
    prepared = load_config(config).prepared_dir()  # shared with `ray-crm prepare --config` of the benchmark
    base = [f"name={name}{args.experiment}", f"data.output_dir={prepared}", *args.overrides]
    cfg = load_config(config, base)
    run_stage("bench", cfg)
    if not (prepared / "manifest.json").is_file():
        run_stage("prepare", cfg)
    grid = sorted({0.0, *args.lambdas})

    def sweep_config(lambdas: list[float], suffix: str = "", extra: tuple[str, ...] = ()):
        space = f"sweep.space={{loss.lambda_mmd: {{grid: {lambdas}}}, train.seed: {{grid: {args.seeds}}}}}"
        return load_config(config, [*base, f"loss.type={family['loss']}", f"loss.variant={args.variant}", space,
                                    f"sweep.stage={family['stage']}", f"name={name}{args.experiment}{suffix}",
                                    "sweep.metric=val_balanced_accuracy", "sweep.bias_metric=val_ci_gap_std",
                                    f"output_dir={Path(cfg.output_dir).resolve()}", "sweep.resume=true", *extra])

    # (lambdas, name suffix, overrides) of each sweep: the vanilla models by themselves when the causal ones have
    # settings of their own
    plan = ([([0.0], "", ()), (sorted(args.lambdas), "-causal", tuple(args.causal_overrides))]
            if args.causal_overrides else [(grid, "", ())])
    runs = [sweep_config(*p) for p in plan]
    sweeps = {"vanilla": runs[0], "causal": runs[-1]}  # whose training settings each kind of model must have

    def trained() -> list[dict]:
        """Every exported model of a crm_<bench>* sweep trained as this command trains it, one per (lambda, seed)."""
        rows, seen = [], set()
        for card_path in sorted(Path(cfg.output_dir).resolve().glob(f"{name}*-*/{family['stage']}/*/export/model_card.json")):
            card = json.loads(card_path.read_text())
            c = card["config"]
            key = (c["loss"]["lambda_mmd"], c["train"]["seed"])
            if (c["loss"]["variant"] != args.variant or key[0] not in grid or key[1] not in args.seeds or key in seen
                    or not same_training(c, sweeps["vanilla" if key[0] == 0 else "causal"])):
                continue
            seen.add(key)
            rows.append({"lambda": c["loss"]["lambda_mmd"], "seed": c["train"]["seed"],
                         "model": str(card_path.parent / "merged"),
                         **{k: card["metrics"][k] for k in ("val_accuracy", "val_balanced_accuracy", "val_ci_gap_std",
                                                            "val_reward_std", "val_z_spearman", "step")}})
        return rows

    if not args.no_sweep:
        have = {(r["lambda"], r["seed"]) for r in trained()}
        for lambdas, suffix, extra in plan:
            todo = [lam for lam in lambdas if any((lam, s) not in have for s in args.seeds)]
            if todo != lambdas:  # trained by an earlier sweep with the same settings: not trained again
                print(f"lambdas {sorted(set(lambdas) - set(todo))} x seeds {args.seeds}: trained already")
            if todo:  # named by its lambdas: a resumed Tune sweep keeps the grid it started with
                run_stage("sweep", sweep_config(todo, f"{suffix}-l{'_'.join(f'{lam:g}' for lam in todo)}", extra))
    rows = trained()
    if args.validation_only:
        write_json(out.with_name(f"{name}_validation.json"), {
            "bench": args.bench, "family": args.family, "variant": args.variant, "overrides": args.overrides,
            "causal_overrides": args.causal_overrides,
            "command": " ".join(["python", "benchmarks/crm_seeds.py", *sys.argv[1:]]),
            "note": "validation figures of the models trained so far; no test evaluation, no lambda chosen",
            "models": rows})
        print(json.dumps(rows, indent=2))
        return
    missing = sorted({(lam, s) for lam in grid for s in args.seeds} - {(r["lambda"], r["seed"]) for r in rows})
    if missing and not args.no_sweep:
        sys.exit(f"models missing for (lambda, seed) {missing}: rerun to resume the sweep")
    complete = [lam for lam in grid if all((lam, s) not in missing for s in args.seeds)]
    if 0.0 not in complete or len(complete) < 2:
        sys.exit(f"no lambda > 0 has a model for every seed besides vanilla (missing: {missing})")
    chosen = choose_lambda([r for r in rows if r["lambda"] in complete], args.max_accuracy_drop)

    labels = {f"l{r['lambda']:g}-s{r['seed']}": r for r in rows}
    models = [f"{label}={r['model']}" for label, r in labels.items()]
    threads = cfg.ray.num_cpus or os.cpu_count() or 1  # eval scores in this process alone, after the sweeps
    eval_cfg = load_config(config, [*base, f"eval.models={json.dumps(models)}", f"ray.torch_threads={threads}"])
    report = json.loads(Path(run_stage("eval", eval_cfg)["report"]).read_text())["results"]
    headline, beside = FIGURES[args.bench]
    for label, r in labels.items():
        res = report[label][args.bench]
        r["test"] = {k: res[k] for k in ("accuracy", headline, *beside, "reward_scale")}

    def test_values(lam: float, key: str) -> list[float]:
        return [labels[f"l{lam:g}-s{s}"]["test"][key] for s in args.seeds if f"l{lam:g}-s{s}" in labels]

    per_lambda = {f"{lam:g}": {k: {**mean_se(test_values(lam, k)), "values": test_values(lam, k)}
                               for k in ("accuracy", headline, *beside, "reward_scale")} for lam in grid}
    cuts = {}
    for key in CUTS[args.bench]:
        van, crm = np.abs(test_values(0.0, key)), np.abs(test_values(chosen, key))
        cut = list(1.0 - crm / van)
        cuts[key] = {**mean_se(cut), "ci95": interval(cut), "values": cut}
    acc_gain = list(np.subtract(test_values(chosen, "accuracy"), test_values(0.0, "accuracy")))
    spread = list(np.divide(test_values(chosen, "reward_scale"), test_values(0.0, "reward_scale")))
    result = {
        "bench": args.bench, "family": args.family, "variant": args.variant, "lambdas": grid, "seeds": args.seeds,
        "overrides": args.overrides, "causal_overrides": args.causal_overrides,
        "command": " ".join(["python", "benchmarks/crm_seeds.py", *sys.argv[1:]]),
        "selection": f"lowest mean val_ci_gap_std within {args.max_accuracy_drop:g} of the best mean val_balanced_accuracy",
        "chosen_lambda": chosen, "headline": headline, "cuts": cuts,
        "missing": [{"lambda": lam, "seed": s} for lam, s in missing],  # trials not run: never chosen, reported as run
        "accuracy_change": {**mean_se(acc_gain), "ci95": interval(acc_gain), "values": acc_gain},
        "spread_ratio": {**mean_se(spread), "values": spread},
        "per_lambda": per_lambda, "models": rows,
    }
    write_json(out, result)
    print(markdown(result))


def write_json(path: Path, data: dict) -> None:
    """Beside, then renamed: a killed run leaves the previous file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


if __name__ == "__main__":
    main()
