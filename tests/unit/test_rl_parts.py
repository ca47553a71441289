"""Pure parts of the rollout / reward side (issue #7): seeds, slicing, weight packing, LoRA merging, scorers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from ray_crm.config import RolloutConfig
from ray_crm.rl.supervision import contiguous_slices, start_together
from ray_crm.rl.vllm_engine import Sampling, engine_args, engine_env, render_prompt, request_seeds
from ray_crm.rl.weights import pack_state_dict, policy_state_dict


def test_request_seeds_are_reproducible_distinct_and_spaced_for_n_samples():
    a = request_seeds(0, 3, count=100)
    assert a == request_seeds(0, 3, count=100)
    assert a != request_seeds(0, 4, count=100) and a != request_seeds(1, 3, count=100)
    assert len(set(a)) == 100
    assert all(s % 2**16 == 0 and 0 <= s < 2**63 for s in a)  # vLLM seeds sample k with seed + k
    assert request_seeds(None, 3, count=2) == [None, None]


@pytest.mark.parametrize("total,parts", [(10, 3), (2, 4), (0, 2), (8, 8), (7, 1)])
def test_contiguous_slices_cover_in_order_and_balance(total, parts):
    slices = contiguous_slices(total, parts)
    assert len(slices) == parts
    assert [i for a, b in slices for i in range(a, b)] == list(range(total))
    sizes = [b - a for a, b in slices]
    assert max(sizes) - min(sizes) <= 1


class _Group:
    """An actor group's lifecycle: it starts only once its peers are starting too (a barrier), and records its close."""

    def __init__(self, barrier: threading.Barrier, closed: list[str], name: str, fail: bool = False):
        barrier.wait(timeout=10)  # a BrokenBarrierError unless the other factories run at the same time
        if fail:
            raise RuntimeError(f"{name} failed to start")
        self.name, self.closed = name, closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.closed.append(self.name)


def test_start_together_overlaps_start_ups_and_closes_the_started_ones_on_a_failure():
    closed: list[str] = []
    barrier = threading.Barrier(3)
    groups = start_together(*(lambda n=n: _Group(barrier, closed, n) for n in ("learner", "rollout", "reward")))
    assert [g.name for g in groups] == ["learner", "rollout", "reward"] and closed == []
    barrier = threading.Barrier(3)
    with pytest.raises(RuntimeError, match="rollout failed to start"):
        start_together(lambda: _Group(barrier, closed, "learner"), lambda: _Group(barrier, closed, "rollout", fail=True),
                       lambda: _Group(barrier, closed, "reward"))
    assert sorted(closed) == ["learner", "reward"]


def test_packed_weights_round_trip_any_dtype_and_layout():
    state = {
        "w": torch.randn(4, 6),
        "t": torch.randn(6, 4).t(),  # non-contiguous
        "h": torch.randn(3, dtype=torch.bfloat16),
        "i": torch.arange(5),
    }
    packed = pack_state_dict(state)
    assert packed.nbytes == sum(t.numel() * t.element_size() for t in state.values())
    back = dict(packed.tensors())
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def test_packing_marks_partial_state_dicts():
    assert not pack_state_dict({"w": torch.randn(3)}).partial
    assert pack_state_dict({"w": torch.randn(3)}, partial=True).partial


def test_packing_casts_floats_to_the_engine_dtype_only():
    packed = dict(pack_state_dict({"w": torch.randn(3), "i": torch.arange(3)}, torch.bfloat16).tensors())
    assert packed["w"].dtype == torch.bfloat16 and packed["i"].dtype == torch.int64


def test_policy_state_dict_merges_lora_without_touching_the_model(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    plain = {k: v.clone() for k, v in policy_state_dict(base).items()}
    assert plain.keys() == base.state_dict().keys()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # B starts at zero: make the adapter do something
    before = {k: v.clone() for k, v in model.state_dict().items()}
    merged = policy_state_dict(model)
    assert not any(t.requires_grad for t in merged.values())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    reference = model.merge_and_unload().state_dict()
    assert merged.keys() == reference.keys()
    assert all(torch.allclose(merged[k], reference[k], atol=1e-6) for k in reference)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q], plain[q])


def test_lora_targets_only_sends_the_merged_targets_with_their_fused_siblings(tiny_llama_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with pytest.raises(ValueError, match="PEFT"):
        policy_state_dict(base, lora_targets_only=True)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    full = policy_state_dict(model)
    sent = policy_state_dict(model, lora_targets_only=True)
    layers = range(base.config.num_hidden_layers)
    expected = [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in layers for p in "qkv"]
    expected += [f"model.layers.{i}.mlp.{p}_proj.weight" for i in layers for p in ("gate", "up")]
    assert sorted(sent) == sorted(expected)
    assert all(torch.equal(sent[k], full[k]) for k in sent)


def test_repack_rebuilds_a_tied_layer_only_when_its_owner_may_have_changed():
    from ray_crm.rl.vllm_engine import repack_tied_layers

    class Method:
        def __init__(self):
            self.calls = 0

        def process_weights_after_loading(self, layer):
            self.calls += 1

    class Layer(torch.nn.Module):
        def __init__(self, weight):
            super().__init__()
            self.weight, self.quant_method = weight, Method()

    model = torch.nn.Module()
    model.embed_tokens = Layer(torch.nn.Parameter(torch.randn(4, 2)))
    model.proj = Layer(torch.nn.Parameter(torch.randn(2, 2)))
    model.lm_head = Layer(model.embed_tokens.weight)
    assert repack_tied_layers(model) == 1 and model.lm_head.quant_method.calls == 1
    assert repack_tied_layers(model, loaded=frozenset({"proj.weight"})) == 0
    assert repack_tied_layers(model, loaded=frozenset({"model.embed_tokens.weight"})) == 1
    assert model.embed_tokens.quant_method.calls == model.proj.quant_method.calls == 0
    # on CPU the owner's freshly packed kernel is shared instead of packing the same weight again
    model.embed_tokens.cpu_linear, model.lm_head.cpu_linear = "new kernel", "stale kernel"
    assert repack_tied_layers(model) == 1 and model.lm_head.cpu_linear == "new kernel"
    assert model.lm_head.quant_method.calls == 2


def test_policy_state_dict_sends_tied_weights_once():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=1, head_dim=32, tie_word_embeddings=True)
    state = policy_state_dict(LlamaForCausalLM(cfg))
    assert "model.embed_tokens.weight" in state and "lm_head.weight" not in state


def test_sampling_defaults_come_from_config_and_calls_override_them():
    cfg = RolloutConfig(n_samples=4, temperature=0.9, stop=["\n\n"])
    s = Sampling.from_config(cfg, n=1, temperature=0.0)
    assert (s.n, s.temperature, s.max_new_tokens, s.stop) == (1, 0.0, cfg.max_new_tokens, ("\n\n",))


def test_engine_args_cpu_vs_gpu():
    cpu = engine_args("m", RolloutConfig(kv_cache_gib=0.5, max_model_len=16384))
    assert cpu["enable_chunked_prefill"] is False  # per-request seeds crash with it on CPU
    assert cpu["max_num_batched_tokens"] == 16384 and cpu["kv_cache_memory_bytes"] == 2**29
    assert "weight_transfer_config" not in cpu
    gpu = engine_args("m", RolloutConfig(use_gpu=True, tensor_parallel_size=2, dtype="bf16"))
    assert gpu["weight_transfer_config"] == {"backend": "nccl"} and gpu["distributed_executor_backend"] == "ray"
    assert gpu["dtype"] == "bfloat16" and "kv_cache_memory_bytes" not in gpu
    # a CPU engine compiles through inductor's cache: vLLM's AOT artifact fails to load back there
    assert engine_env(RolloutConfig(), Path("c"))["VLLM_USE_AOT_COMPILE"] == "0"
    assert "VLLM_USE_AOT_COMPILE" not in engine_env(RolloutConfig(use_gpu=True), Path("c"))


def test_render_prompt_applies_the_chat_template(tiny_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    chat = render_prompt(tok, "a good movie", apply_chat_template=True)
    assert tok.decode(chat) == "<|user|>a good movie</s><|assistant|>"
    assert render_prompt(tok, [{"role": "user", "content": "a good movie"}], apply_chat_template=False) == chat
    assert tok.decode(render_prompt(tok, "a good movie", apply_chat_template=False)) == "a good movie"


def test_vader_gold_scores_the_response_sentiment():
    from ray_crm.rl.reward_actor import VaderScorer

    good, bad = VaderScorer().score(["review it"] * 2, ["a wonderful, great film", "an awful, boring film"])
    assert good > 0.5 and bad < -0.5


def test_a_rerun_resumes_only_under_the_same_learning_settings():
    import yaml

    from ray_crm.config import Config, dump_config, validate
    from ray_crm.rl.grpo_trainer import changed_settings

    old = Config().model_dump(mode="json")
    assert changed_settings(yaml.safe_load(dump_config(Config())), old) == []  # the saved file reads back equal
    new = validate({"ray": {"num_cpus": 7}, "name": "elsewhere",  # other sections: not the run's settings
                    "rl": {"steps": 500, "lr": 1e-4, "lora": {"rank": 4, "alpha": 32}, "checkpoint_every": 9},
                    "rollout": {"generate_timeout_s": 5000.0, "temperature": 1.0},
                    "reward": {"gold": [{"name": "vader", "kind": "vader"}], "call_timeout_s": 9.0}})
    assert changed_settings(old, new.model_dump(mode="json")) == [
        "reward.gold", "rl.lora.rank", "rl.lr", "rollout.temperature"]
    # asking for more steps (or waiting longer, checkpointing more often) resumes
    more = validate({"rl": {"steps": 500, "checkpoint_every": 9}, "rollout": {"sync_timeout_s": 1.0}})
    assert changed_settings(old, more.model_dump(mode="json")) == []
    # a key the saved settings lack (a run from an older schema) counts as changed
    del old["rl"]["clip_eps"]
    assert changed_settings(old, Config().model_dump(mode="json")) == ["rl.clip_eps"]
