"""Sequence log-probs over the response and DPO's implicit reward, against an independent computation."""

from __future__ import annotations

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ray_crm.config import LoraConfig
from ray_crm.data.encode import PairEncoder
from ray_crm.models.loading import load_policy_model, pad_sequences, tokenizer_at
from ray_crm.models.logprobs import LOGIT_BUDGET, implicit_reward, response_mask, rows_within_logit_budget


def _by_hand(model, ids: list[int], start: int) -> float:
    """sum_t log p(ids[t] | ids[:t]) over the response, one unpadded sequence at a time."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return float(sum(logp[t - 1, ids[t]] for t in range(max(start, 1), len(ids))))


def test_response_mask_covers_the_response_and_no_padding():
    attention = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert response_mask(attention, [2, 0]).tolist() == [[0, 1, 1, 1], [1, 1, 0, 0]]


def test_implicit_reward_is_beta_times_the_log_ratio_of_policy_and_base(tiny_llama_dir):
    torch.manual_seed(0)
    tok = tokenizer_at(tiny_llama_dir)
    policy = load_policy_model(tiny_llama_dir, LoraConfig(rank=4, alpha=8), tok.pad_token_id).eval()
    with torch.no_grad():  # LoRA starts as the identity (B = 0): move it so the ratio is not 1
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    enc = PairEncoder(str(tiny_llama_dir), max_length=64)
    out = enc.encode(["the movie was", "a film"], ["great fun and very good", "bad"])
    batch = pad_sequences(out.input_ids, None, tok.pad_token_id)
    beta = 0.3
    with torch.no_grad():
        ours = implicit_reward(policy, batch, out.response_starts, beta)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    reference = torch.tensor([_by_hand(base, ids, s) for ids, s in zip(out.input_ids, out.response_starts)])
    with torch.no_grad():  # the precomputed reference gives the same rewards without the adapter-off forward
        given = implicit_reward(policy, batch, out.response_starts, beta, reference)
    torch.testing.assert_close(given, ours, atol=1e-4, rtol=1e-4)
    merged = policy.merge_and_unload().eval()
    for i, (ids, start) in enumerate(zip(out.input_ids, out.response_starts)):
        expected = beta * (_by_hand(merged, ids, start) - _by_hand(base, ids, start))
        assert abs(expected) > 1e-3
        assert abs(float(ours[i]) - expected) < 1e-4 * max(1.0, abs(expected))


def test_scoring_batches_keep_their_logits_within_the_budget():
    assert rows_within_logit_budget(49152, 192, 128) * 49152 * 192 <= LOGIT_BUDGET
    assert rows_within_logit_budget(49152, 192, 128) >= 8
    assert rows_within_logit_budget(100, 10, 64) == 64  # small vocabularies keep the caller's size
    assert rows_within_logit_budget(10**9, 10**6, 64) == 1  # never zero


def test_a_dpo_export_is_scored_by_its_implicit_reward(tiny_llama_dir, tmp_path):
    import json

    from ray_crm.eval.scoring import ImplicitRewardScorer, dpo_card, reference_logprobs, scorer_for

    torch.manual_seed(0)
    tok = tokenizer_at(tiny_llama_dir)
    policy = load_policy_model(tiny_llama_dir, LoraConfig(rank=4, alpha=8), tok.pad_token_id).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    merged = tmp_path / "export" / "merged"
    policy.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    card = {"config": {"loss": {"type": "causal_dpo", "beta": 0.3}, "model": {"name": str(tiny_llama_dir)}}}
    (merged.parent / "model_card.json").write_text(json.dumps(card))

    reference_logprobs.cache_clear()
    scorer = scorer_for(str(merged.parent), max_length=64)
    assert isinstance(scorer, ImplicitRewardScorer)
    prompts, responses = ["the movie was", "a film", "the plot"], ["great fun and very good", "bad", "it was"]
    ours = scorer.score(prompts, responses)
    _, memo = reference_logprobs(scorer.reference, scorer.pad_id)
    assert len(memo) == 3  # a second scorer of the same base reuses the reference's log-probs
    again = scorer_for(str(merged.parent), max_length=64).score(prompts[::-1], responses[::-1])
    np.testing.assert_allclose(again[::-1], ours, rtol=0, atol=1e-5)
    assert len(memo) == 3
    enc = PairEncoder(str(tiny_llama_dir), max_length=64).encode(prompts, responses)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    trained = AutoModelForCausalLM.from_pretrained(merged).eval()
    for i, (ids, start) in enumerate(zip(enc.input_ids, enc.response_starts)):
        assert abs(ours[i] - 0.3 * (_by_hand(trained, ids, start) - _by_hand(base, ids, start))) < 1e-4
    card["config"]["loss"]["type"] = "crm"  # a reward model's card: scored by its head, not as a policy
    (merged.parent / "model_card.json").write_text(json.dumps(card))
    assert dpo_card(merged) is None and dpo_card(tmp_path) is None
