"""The main job: every stage that exists, in order, on a real model and real data on one Ray cluster."""

from __future__ import annotations

import json
import time
from typing import Any

from ray_crm.assets import fetch_all
from ray_crm.config import Config, dump_config
from ray_crm.runtime import init_ray
from ray_crm.stages import STAGES, run_stage

# The pipeline order; a stage joins the demo once it is registered in STAGES.
PIPELINE = ("prepare", "train-rm", "eval")


def run_demo(cfg: Config) -> dict[str, Any]:
    fetch_all()
    init_ray(cfg.ray)
    out = cfg.stage_dir("demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    results: dict[str, Any] = {}
    for name in (s for s in PIPELINE if s in STAGES):
        start = time.perf_counter()
        print(f"== ray-crm demo: {name}", flush=True)
        results[name] = run_stage(name, cfg)
        results[name]["seconds"] = round(time.perf_counter() - start, 1)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    results["summary"] = str(out / "summary.json")
    return results
