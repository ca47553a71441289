"""A vLLM CPU engine's warm start: inductor's compile cache (the project's setting) against vLLM's AOT artifact,
and against no compilation at all (`rollout.enforce_eager`).

    python benchmarks/bench_engine_start.py     # writes benchmarks/results/engine_start.json
    python benchmarks/bench_engine_start.py --settings inductor_cache eager --out benchmarks/results/engine_eager.json

On the CPU backend vLLM's AOT-compiled artifact fails to load back ("'function' object has no attribute
'finalize_loading'") and the model compiles again at every start; `engine_env` therefore sets
`VLLM_USE_AOT_COMPILE=0` on CPU. For each setting, in the same run: two fresh processes build the engine of
`configs/rl_length.yaml` (SmolLM2-135M-Instruct, fp32) on a cache folder of their own, the first filling the
cache, the second timed (`warm_start_s`), then generating 32 x 48 tokens. `--rounds` alternates the settings.
An eager engine compiles nothing: it starts sooner and decodes slower, and which wins depends on how many tokens
a run generates per engine start (`generate_s` here is for 32 x 48 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# VLLM_USE_AOT_COMPILE and rollout.enforce_eager of each setting
SETTINGS = {"inductor_cache": ("0", False), "aot_artifact": ("1", False), "eager": ("0", True)}


def start_once(setting: str, cache: Path) -> dict[str, float]:
    """In this (fresh) process: build the engine as a rollout actor does, time it and one generate call."""
    from ray_crm.assets import resolve_model
    from ray_crm.config import load_config
    from ray_crm.rl.vllm_engine import engine_args, engine_env

    aot, eager = SETTINGS[setting]
    cfg = load_config(ROOT / "configs" / "rl_length.yaml").rollout.model_copy(update={"enforce_eager": eager})
    os.environ.update({**engine_env(cfg, cache), "VLLM_USE_AOT_COMPILE": aot})
    import torch

    torch.set_num_threads(cfg.engine_threads or 1)
    t0 = time.perf_counter()
    from vllm import LLM, SamplingParams

    llm = LLM(**engine_args(resolve_model("smollm2"), cfg))
    t1 = time.perf_counter()
    llm.generate(["Write a positive sentence about a film."] * 32, SamplingParams(max_tokens=48, seed=0))
    return {"start_s": t1 - t0, "generate_s": time.perf_counter() - t1}


def child(setting: str, cache: Path) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--child", setting, str(cache)], check=True, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=["inductor_cache", "aot_artifact"])
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_start.json"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(start_once(args.child[0], Path(args.child[1]))))
        return
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in args.settings}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name in args.settings:
                cache = Path(tmp) / f"{name}_{r}"
                cold = child(name, cache)
                warm = child(name, cache)
                runs[name].append({"cold_start_s": cold["start_s"], "warm_start_s": warm["start_s"],
                                   "warm_generate_s": warm["generate_s"]})
                print(name, runs[name][-1], flush=True)
    median = {name: statistics.median(r["warm_start_s"] for r in rs) for name, rs in runs.items()}
    generate = {name: statistics.median(r["warm_generate_s"] for r in rs) for name, rs in runs.items()}
    result = {"command": "python benchmarks/bench_engine_start.py " + " ".join(sys.argv[1:]),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "runs": runs, "warm_start_median_s": median, "warm_generate_median_s": generate}
    for other in ("aot_artifact", "eager"):
        if other in median and "inductor_cache" in median:
            result[f"{other.split('_')[0]}_over_inductor_warm_start"] = median[other] / median["inductor_cache"]
            result[f"{other.split('_')[0]}_over_inductor_generate"] = generate[other] / generate["inductor_cache"]
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))


if __name__ == "__main__":
    main()
