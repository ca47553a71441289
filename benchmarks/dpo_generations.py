"""Do Causal DPO policies answer longer or shorter than plain DPO's? Their own generations, through vLLM.

    python benchmarks/dpo_generations.py        # -> benchmarks/results/cdpo_length_generations.json

Every policy of a result file of `crm_seeds.py --family dpo --bench length` (default: the 3-seed run's
`benchmarks/results/cdpo_length.json`; a `--validation-only` pilot's file works too), each lambda and seed,
and the base model it started from
sample `--samples` answers to each test prompt of the length benchmark, with the same sampling seeds, through
the project's own Ray Data + vLLM batch inference (`ray_crm.rl.batch_inference`). Reported per model: mean
answer length in tokens, the share that ended on their own (EOS) within `--max-new-tokens`, and the VADER
compound score of the answers (the benchmark asks for positive sentences); per lambda the mean +- standard
error over seeds, and per seed the length ratio of Causal DPO to DPO with its 95% t interval.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import ray

from ray_crm.config import load_config
from ray_crm.rl.batch_inference import sample_dataset, score_dataset
from ray_crm.runtime import init_ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from crm_seeds import interval, mean_se


def generate(model: str, prompts: list[str], cfg, samples: int, max_new_tokens: int) -> dict[str, float]:
    ds = ray.data.from_items([{"prompt": p} for p in prompts])
    rows = score_dataset(sample_dataset(ds, model, cfg.rollout, cfg.ray.torch_threads, n=samples,
                                        max_new_tokens=max_new_tokens, seed=0), cfg.reward).to_pandas()
    return {"response_tokens": float(rows.response_tokens.mean()),
            "eos_fraction": float((rows.finish_reason == "stop").mean()),
            "vader": float(rows.gold_vader.mean()), "answers": len(rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--result", default=str(ROOT / "benchmarks" / "results" / "cdpo_length.json"),
                   help="a crm_seeds.py --family dpo result file (its `models` list)")
    p.add_argument("--samples", type=int, default=32, help="answers per test prompt and model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    result = json.loads(Path(args.result).read_text())
    cfg = load_config(ROOT / "configs" / "dpo_length.yaml", [
        "rollout.enforce_eager=true", "rollout.engine_threads=2", "rollout.max_model_len=512", "rollout.temperature=0.7",
        "reward.gold=[{name: vader, kind: vader}]"])
    import pandas as pd

    test = Path(load_config(ROOT / "configs" / "dpo_length.yaml").data.paths["test"][0])
    prompts = sorted(pd.read_parquet(test, columns=["prompt"]).prompt.unique())
    init_ray(cfg.ray)
    base = str(Path(load_config(ROOT / "configs" / "dpo_length.yaml").model.name))
    from ray_crm.assets import resolve_model

    per_model = {"base": generate(str(resolve_model(base)), prompts, cfg, args.samples, args.max_new_tokens)}
    for m in result["models"]:
        label = f"l{m['lambda']:g}-s{m['seed']}"
        per_model[label] = {"lambda": m["lambda"], "seed": m["seed"],
                            **generate(m["model"], prompts, cfg, args.samples, args.max_new_tokens)}
        print(label, per_model[label], flush=True)
    lambdas = sorted({m["lambda"] for m in result["models"]})
    seeds = sorted({m["seed"] for m in result["models"]})
    per_lambda = {f"{lam:g}": {k: mean_se([per_model[f"l{lam:g}-s{s}"][k] for s in seeds])
                               for k in ("response_tokens", "eos_fraction", "vader")} for lam in lambdas}
    ratios = {}
    for lam in lambdas:
        if lam > 0:
            r = [per_model[f"l{lam:g}-s{s}"]["response_tokens"] / per_model[f"l0-s{s}"]["response_tokens"] for s in seeds]
            ratios[f"{lam:g}"] = {**mean_se(r), "ci95": interval(r), "values": r}
    out = {"command": " ".join(["python", "benchmarks/dpo_generations.py", *sys.argv[1:]]), "prompts": prompts,
           "samples_per_prompt": args.samples, "max_new_tokens": args.max_new_tokens, "temperature": 0.7,
           "per_model": per_model, "per_lambda": per_lambda, "length_ratio_over_dpo": ratios}
    path = Path(args.result).with_name(Path(args.result).stem.removesuffix("_validation") + "_generations.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(json.dumps({"per_lambda": per_lambda, "length_ratio_over_dpo": ratios}, indent=2))


if __name__ == "__main__":
    main()
