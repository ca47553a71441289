"""The GRPO learner on a tiny Llama (no Ray; one rank, its DeepSpeed engine on an in-memory process group):
log-prob alignment, regularizers, skipped non-finite steps, resume from a checkpoint, exported weights."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from pydantic import ValidationError

from ray_crm.config import BF16_MIN_FD_EPS, PolicyLoraConfig, RLConfig
from ray_crm.models.logprobs import token_entropy, token_logprobs
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner, micro_batches, shard

PROMPTS = [[1, 7, 9, 12], [1, 30]]
RESPONSES = [[40, 41, 42], [50, 51, 52, 53, 54, 55]]
T = 0.7


def _cfg(**kw) -> RLConfig:
    base = {"lr": 5e-2, "micro_batch_size": 1, "regularizer": "none", "lora": PolicyLoraConfig(rank=4, alpha=8)}
    return RLConfig(**{**base, **kw})


def _batch(advantages=(1.0, -1.0), engine=None) -> PolicyBatch:
    engine = engine or [[0.0] * len(r) for r in RESPONSES]
    return PolicyBatch(PROMPTS, RESPONSES, list(advantages), engine, T, max_new_tokens=8)


def _sequence_logprobs(learner: PolicyLearner) -> list[list[float]]:
    """Each response token's log-prob, one sequence at a time (no padding): the reference computation."""
    out = []
    with torch.no_grad():
        for p, r in zip(PROMPTS, RESPONSES):
            ids = torch.tensor([p + r])
            logits = learner.model(input_ids=ids).logits[0, len(p) - 1 : -1] / T
            out.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(r)[:, None]).squeeze(-1).tolist())
    return out


def _params(learner):
    return [p.detach().clone() for p in learner.params]


def _adam(learner) -> dict[int, dict[str, torch.Tensor]]:
    state = learner.engine.optimizer.state_dict()["state"]
    return {i: {k: v.clone() for k, v in s.items()} for i, s in state.items()}


def _same_adam(a, b) -> bool:
    return a.keys() == b.keys() and all(
        a[i].keys() == b[i].keys() and all(torch.equal(a[i][k], b[i][k]) for k in a[i]) for i in a)


def test_response_mask_marks_the_positions_that_predict_response_tokens():
    (mb,) = micro_batches(PROMPTS, RESPONSES, pad_id=0, micro_batch_size=2)
    assert mb.input_ids.shape == (2, 8) and mb.input_ids[1, 7].item() == 55 and mb.input_ids[0, 7].item() == 0
    assert mb.attention_mask[0].tolist() == [1] * 7 + [0]
    assert mb.response_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 0]
    assert mb.response_mask[1].tolist() == [0, 1, 1, 1, 1, 1, 1]
    # the masked positions' targets are exactly the response tokens
    targets = mb.input_ids[:, 1:]
    assert targets[0][mb.response_mask[0].bool()].tolist() == RESPONSES[0]
    assert targets[1][mb.response_mask[1].bool()].tolist() == RESPONSES[1]


def test_packed_rows_hold_whole_sequences_with_restarting_positions_and_the_same_response_targets():
    (mb,) = micro_batches(PROMPTS, RESPONSES, pad_id=0, micro_batch_size=2, pack_tokens=64)
    # first fit by decreasing length: the 8-token sequence 1 first, then the 7-token sequence 0
    assert mb.input_ids.shape == (1, 15) and mb.input_ids[0].tolist() == PROMPTS[1] + RESPONSES[1] + PROMPTS[0] + RESPONSES[0]
    assert mb.position_ids[0].tolist() == list(range(8)) + list(range(7))
    assert mb.response_mask[0].tolist() == [0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1]  # no target across the seam
    assert mb.sequence[0].tolist() == [1] * 7 + [-1] + [0] * 6  # the seam predicts no token of either
    assert mb.input_ids[:, 1:][mb.response_mask.bool()].tolist() == RESPONSES[1] + RESPONSES[0]
    assert mb.per_token(torch.tensor([2.0, -3.0]))[0].tolist() == [0, -3, -3, -3, -3, -3, -3, 0, 0, 0, 0, 2, 2, 2]
    assert set(mb.model_inputs(torch.device("cpu"))) == {"input_ids", "position_ids"}  # no mask: block-diagonal
    # a row holds what fits: 7 + 8 tokens do not fit in 10, so two rows, and no packing left to declare
    (mb,) = micro_batches(PROMPTS, RESPONSES, pad_id=0, micro_batch_size=2, pack_tokens=10)
    assert mb.input_ids.shape == (2, 8) and mb.position_ids is None


def test_token_logprobs_are_of_the_tempered_distribution():
    logits = torch.randn(1, 3, 5)
    ids = torch.tensor([[0, 2, 4]])
    expected = torch.log_softmax(logits[0, :2] / 0.5, -1)[[0, 1], [2, 4]]
    assert torch.allclose(token_logprobs(logits, ids, 0.5)[0], expected, atol=1e-6)


@pytest.mark.parametrize("pack_tokens", [0, 64], ids=["padded", "packed"])
def test_batched_logprobs_equal_one_sequence_at_a_time(tiny_llama_dir, pack_tokens):
    learner = PolicyLearner(tiny_llama_dir, _cfg(micro_batch_size=2, pack_tokens=pack_tokens))
    exact = _sequence_logprobs(learner)
    # the learner's own log-probs as engine log-probs: the measured gap is zero; shifted by 0.5: 0.5
    assert learner_gap(learner, exact) == pytest.approx(0.0, abs=1e-5)
    assert learner_gap(learner, [[x + 0.5 for x in row] for row in exact]) == pytest.approx(0.5, abs=1e-4)


def learner_gap(learner, engine) -> float:
    group = learner.engine.optimizer.param_groups[0]
    lr, group["lr"] = group["lr"], 0.0
    try:
        return learner.step(_batch(engine=engine))["policy/engine_logprob_gap"]
    finally:
        group["lr"] = lr


def test_a_step_raises_the_favoured_response_and_lowers_the_other(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _cfg())
    before = _sequence_logprobs(learner)
    stats = learner.step(_batch(advantages=(1.0, -1.0)))
    after = _sequence_logprobs(learner)
    assert sum(after[0]) > sum(before[0]) and sum(after[1]) < sum(before[1])
    assert stats["policy/clip_fraction"] == 0.0 and stats["policy/grad_norm"] > 0
    assert stats["policy/response_tokens"] == len(RESPONSES[0]) + len(RESPONSES[1])


def test_gr_with_gamma_zero_steps_like_no_regularizer_and_gamma_changes_the_step(tiny_llama_dir):
    """Also the update's time split: a plain update spends ~nothing beyond its gradient, GR a second gradient."""
    steps, times = {}, {}
    for name, kw in {"none": {}, "gr0": {"regularizer": "gr", "gr_gamma": 0.0},
                     "gr": {"regularizer": "gr", "gr_gamma": 1.0, "gr_fd_eps": 1e-2}}.items():
        learner = PolicyLearner(tiny_llama_dir, _cfg(lr=1e-3, **kw))
        start = _params(learner)
        stats = learner.step(_batch())
        steps[name] = [p.detach() - s for p, s in zip(learner.params, start)]
        times[name] = {k: stats[f"time/learn_{k}_s"] for k in ("grad", "regularizer", "step")}
        assert all(t > 0 for t in (times[name]["grad"], times[name]["step"])), times[name]
        if name != "none":
            assert stats["gr/g1_norm"] > 0 and stats["gr/g2_norm"] > 0
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(steps["none"], steps["gr0"]))
    assert not all(torch.allclose(a, b, atol=1e-7) for a, b in zip(steps["none"], steps["gr"]))
    assert times["none"]["regularizer"] < 0.1 * times["none"]["grad"]
    assert times["gr"]["regularizer"] > 0.3 * times["gr"]["grad"]


def test_gr_perturbs_only_transformer_block_parameters(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _cfg(regularizer="gr", lora=PolicyLoraConfig(enabled=False)))
    perturbed = {n for n, moved in zip(learner.names, learner.perturb) if moved}
    assert perturbed and all(".layers." in n for n in perturbed)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(learner.names) - perturbed


@pytest.mark.parametrize("regularizer", ["none", "kl", "gr"])
def test_a_non_finite_loss_skips_the_step_and_leaves_weights_and_adam_bit_for_bit(tiny_llama_dir, regularizer):
    own = {"kl": {"kl_beta": 0.1}, "gr": {"gr_gamma": 1.0, "gr_fd_eps": 1e-2}}  # a setting of another one is refused
    kw = {"regularizer": regularizer, **own.get(regularizer, {})}
    learner = PolicyLearner(tiny_llama_dir, _cfg(**kw))
    assert learner.step(_batch())["skipped"] == 0.0  # Adam has state to lose
    params, adam = _params(learner), _adam(learner)
    stats = learner.step(_batch(advantages=(float("nan"), -1.0)))
    assert (stats["skipped"], stats["skip_reason"]) == (1.0, "non-finite loss")
    assert all(torch.equal(p, q) for p, q in zip(learner.params, params))
    assert _same_adam(_adam(learner), adam) and learner.step_count == 1
    assert all(p.grad is None for p in learner.params)
    # the skip left nothing behind: the next step is the one a learner that never saw the NaN batch takes
    learner.step(_batch(advantages=(-1.0, 1.0)))
    clean = PolicyLearner(tiny_llama_dir, _cfg(**kw))
    clean.step(_batch())
    clean.step(_batch(advantages=(-1.0, 1.0)))
    assert all(torch.equal(p, q) for p, q in zip(learner.params, clean.params))
    assert _same_adam(_adam(learner), _adam(clean))


def test_gr_skips_a_step_whose_perturbed_gradient_is_not_finite(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _cfg(regularizer="gr", gr_gamma=1.0, gr_fd_eps=1e-2))
    learner.step(_batch())
    params, adam = _params(learner), _adam(learner)
    calls = []
    # NaN in the gradient at the perturbed weights only (g2: the third and fourth of four micro-batch backward
    # passes): the loss and g1 stay finite, the combined GR gradient does not
    learner.params[0].register_hook(lambda g: calls.append(1) or (g * float("nan") if len(calls) > 2 else g))
    stats = learner.step(_batch())
    assert len(calls) == 4 and math.isfinite(stats["policy/loss"]) and math.isfinite(stats["gr/g1_norm"])
    assert (stats["skipped"], stats["skip_reason"]) == (1.0, "non-finite gradient")
    assert all(torch.equal(p, q) for p, q in zip(learner.params, params))  # perturbation undone, no step
    assert _same_adam(_adam(learner), adam) and learner.step_count == 1


def test_kl_starts_at_zero_and_reference_resets_bring_it_back(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _cfg(regularizer="reset", reset_every=2, kl_beta=0.1))
    kls = [learner.step(_batch())["policy/kl_to_reference"] for _ in range(4)]
    assert kls[0] == pytest.approx(0.0, abs=1e-7)  # the reference is the initial policy
    assert kls[1] > 1e-4  # one step away from it
    assert kls[2] == pytest.approx(0.0, abs=1e-7)  # reset after step 2: reference = policy again
    assert kls[3] > 1e-4
    plain = PolicyLearner(tiny_llama_dir, _cfg(regularizer="kl", kl_beta=0.1))
    assert [plain.step(_batch())["policy/kl_to_reference"] > 1e-4 for _ in range(3)] == [False, True, True]


def test_a_resumed_learner_takes_the_same_next_step(tiny_llama_dir, tmp_path):
    a = PolicyLearner(tiny_llama_dir, _cfg(regularizer="kl", kl_beta=0.1))
    a.step(_batch())
    a.save(tmp_path)
    assert not list(tmp_path.glob("*.pt"))  # tensors in safetensors, the rest JSON: nothing to unpickle
    a.step(_batch(advantages=(-1.0, 1.0)))
    b = PolicyLearner(tiny_llama_dir, _cfg(regularizer="kl", kl_beta=0.1, seed=1))
    b.load(tmp_path)
    assert b.step_count == 1
    b.step(_batch(advantages=(-1.0, 1.0)))
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))
    assert _same_adam(_adam(a), _adam(b))


def test_shards_split_the_batch_round_robin():
    parts = [shard(_batch(), rank, 2) for rank in range(2)]
    assert [p.prompt_ids for p in parts] == [[PROMPTS[0]], [PROMPTS[1]]]
    assert [p.advantages for p in parts] == [[1.0], [-1.0]] and parts[0].max_new_tokens == 8
    assert shard(_batch(), 2, 3).prompt_ids == []  # more ranks than sequences: an empty shard


def test_engine_weights_and_the_exported_policy_are_the_trained_policy(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    learner = PolicyLearner(tiny_llama_dir, _cfg())
    learner.step(_batch())
    weights, partial = learner.engine_weights()
    assert partial and weights and all(".layers." in n for n in weights)
    folder = learner.save_policy(tmp_path / "policy")
    exported = AutoModelForCausalLM.from_pretrained(folder)
    ids = torch.tensor([PROMPTS[0] + RESPONSES[0]])
    with torch.no_grad():
        assert torch.allclose(exported(input_ids=ids).logits, learner.model(input_ids=ids).logits, atol=1e-5)
    learner.step(_batch())  # exporting left the learner intact


def test_gr_needs_trainable_block_parameters(tiny_llama_dir):
    with pytest.raises(ValueError, match="transformer-block"):
        PolicyLearner(tiny_llama_dir, _cfg(regularizer="gr", lora=PolicyLoraConfig(target_modules=["lm_head"])))


def test_learner_ranks_are_reserved_for_a_trial_and_their_engines_keep_fp32():
    from ray_crm.config import ConfigError, validate
    from ray_crm.rl.grpo_trainer import trial_bundles
    from ray_crm.train.deepspeed_config import policy_deepspeed_config

    rl = {"num_workers": 3, "zero_stage": 2, "learner_cpus": 0.5, "grad_clip": 0.3, "precision": "bf16", "gr_fd_eps": 0.03}
    cfg = validate({"rl": rl})
    ds = policy_deepspeed_config(cfg.rl, world_size=3)
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 0.3
    assert not ds["bf16"]["enabled"] and ds["train_batch_size"] == 3  # bf16 is autocast, weights stay fp32
    one = trial_bundles(validate({"rl": {**rl, "num_workers": 1}}))
    assert trial_bundles(cfg)[1]["CPU"] == pytest.approx(one[1]["CPU"] + 2 * 0.5)
    # ZeRO-3 keeps only the LoRA adapters whole on every rank: a full fine-tune is refused, naming both keys
    with pytest.raises(ConfigError, match="zero_stage=3.*lora.enabled"):
        validate({"rl": {"zero_stage": 3, "lora": {"enabled": False}}})
    assert policy_deepspeed_config(validate({"rl": {"zero_stage": 3}}).rl, 2)["zero_optimization"]["stage"] == 3


def test_gr_under_bf16_autocast_perturbs_fp32_weights_and_tracks_fp32_gr(tiny_llama_dir):
    """rl.precision=bf16 autocasts the passes; weights, the perturbation and Adam stay fp32. At rl.gr_fd_eps=0.03
    (the smallest bf16 is allowed) g1, g2 and the GR gradient norms are within 2% of fp32's and the update's
    direction (cosine) above 0.95; at the fp32 default 1e-3 the rounding noise of bf16 swamps the finite
    difference (norm 1.83 against 1.07, cosine 0.68), which the config refuses."""
    with pytest.raises(ValidationError, match="rl.gr_fd_eps>=0.03"):
        _cfg(regularizer="gr", precision="bf16")
    cfg = {"regularizer": "gr", "gr_gamma": 0.5, "lr": 1e-3, "gr_fd_eps": BF16_MIN_FD_EPS}
    fp32, bf16 = PolicyLearner(tiny_llama_dir, _cfg(**cfg)), PolicyLearner(tiny_llama_dir, _cfg(**cfg, precision="bf16"))
    assert all(p.dtype == torch.float32 for p in bf16.params)
    start = _params(fp32)
    assert all(torch.equal(a, b) for a, b in zip(start, _params(bf16)))
    a, b = fp32.step(_batch()), bf16.step(_batch())
    for key in ("gr/g1_norm", "gr/g2_norm", "policy/grad_norm"):
        assert b[key] == pytest.approx(a[key], rel=0.02), key
    step32 = torch.cat([(p - s).flatten() for p, s in zip(_params(fp32), start)])
    step16 = torch.cat([(p - s).flatten() for p, s in zip(_params(bf16), start)])
    assert torch.nn.functional.cosine_similarity(step32, step16, dim=0) > 0.95


def test_token_entropy_is_log_v_for_uniform_logits_and_zero_for_a_certain_token():
    logits = torch.zeros(1, 3, 7)
    logits[0, 1, 2] = 1e4
    entropy = token_entropy(logits)
    assert entropy[0, 0].item() == pytest.approx(math.log(7)) and entropy[0, 1].item() == pytest.approx(0.0, abs=1e-6)


def test_the_kl_to_the_initial_policy_is_measured_under_every_regularizer_and_survives_resets_and_resume(
        tiny_llama_dir, tmp_path):
    plain = PolicyLearner(tiny_llama_dir, _cfg())
    first = plain.step(_batch())
    assert first["policy/kl_to_initial"] == pytest.approx(0.0, abs=1e-7) and first["policy/entropy"] > 0
    assert plain.step(_batch())["policy/kl_to_initial"] > 1e-4
    # under resets the reference is renewed every 2 steps; the initial policy is not
    reset = PolicyLearner(tiny_llama_dir, _cfg(regularizer="reset", reset_every=2, kl_beta=0.1))
    rows = [reset.step(_batch()) for _ in range(3)]
    assert rows[2]["policy/kl_to_reference"] == pytest.approx(0.0, abs=1e-7) and rows[2]["policy/kl_to_initial"] > 1e-4
    reset.save(tmp_path)
    again = PolicyLearner(tiny_llama_dir, _cfg(regularizer="reset", reset_every=2, kl_beta=0.1))
    again.load(tmp_path)
    assert all(torch.equal(again.initial[k], reset.initial[k]) for k in reset.initial)
    assert again.step(_batch())["policy/kl_to_initial"] == pytest.approx(reset.step(_batch())["policy/kl_to_initial"])
    off = PolicyLearner(tiny_llama_dir, _cfg(monitor={"kl_to_initial": False}))
    assert off.initial is None and "policy/kl_to_initial" not in off.step(_batch())


def test_a_batch_that_skips_the_kl_measurement_saves_its_forward_and_takes_the_same_step(tiny_llama_dir):
    measured, skipped = PolicyLearner(tiny_llama_dir, _cfg()), PolicyLearner(tiny_llama_dir, _cfg())
    forwards = [_count_forwards(measured), _count_forwards(skipped)]
    a = measured.step(_batch())
    b = skipped.step(replace(_batch(), measure_kl=False))
    assert "policy/kl_to_initial" in a and "policy/kl_to_initial" not in b
    assert len(forwards[0]) - len(forwards[1]) == len(RESPONSES)  # the initial policy's, one per micro-batch of one
    assert all(torch.equal(p, q) for p, q in zip(measured.params, skipped.params, strict=True))
    with pytest.raises(ValidationError, match="kl_to_initial=true"):
        _cfg(monitor={"kl_to_initial": False, "kl_every": 4})


def _count_forwards(learner: PolicyLearner) -> list[int]:
    """A list that grows by one at each of the learner's policy forward passes."""
    calls, forward = [], learner._logprobs
    learner._logprobs = lambda *a, **k: calls.append(1) or forward(*a, **k)
    return calls


@pytest.mark.parametrize("kw", [{}, {"regularizer": "gr", "gr_gamma": 1.0, "gr_fd_eps": 1e-2},
                                {"regularizer": "kl", "kl_beta": 0.1}], ids=["none", "gr", "kl"])
def test_a_single_update_takes_its_old_logprobs_from_its_first_gradient_pass_and_steps_as_with_a_forward_of_its_own(
        tiny_llama_dir, kw):
    """One update per batch: the old log-probs come from the gradient pass (one forward less), and the step, its
    loss, and what it measures of the rollouts' policy are those of a learner that recomputes them first."""
    engine = [[-1.0] * len(r) for r in RESPONSES]
    runs = {}
    for reuse in (True, False):
        learner = PolicyLearner(tiny_llama_dir, _cfg(lr=1e-3, **kw))
        assert learner.old_from_first_pass
        learner.old_from_first_pass = reuse
        calls = _count_forwards(learner)
        rows = [learner.step(_batch(engine=engine)) for _ in range(2)]
        runs[reuse] = (_params(learner), rows, len(calls))
    (fast, fast_rows, fast_calls), (slow, slow_rows, slow_calls) = runs[True], runs[False]
    assert fast_calls == slow_calls - 2 * len(PROMPTS)  # one micro-batch forward per sequence per step saved
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fast, slow))
    for a, b in zip(fast_rows, slow_rows):
        for key in ("policy/loss", "policy/grad_norm", "policy/engine_logprob_gap", "policy/entropy",
                    "policy/kl_to_initial", "policy/clip_fraction"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    assert fast_rows[0]["policy/engine_logprob_gap"] > 0 and fast_rows[1]["policy/kl_to_initial"] > 0


def test_several_updates_per_batch_keep_the_old_logprobs_of_a_forward_before_the_first_update(tiny_llama_dir):
    assert not PolicyLearner(tiny_llama_dir, _cfg(epochs=2)).old_from_first_pass
    assert not PolicyLearner(tiny_llama_dir, _cfg(minibatches=2)).old_from_first_pass


def test_packed_and_padded_micro_batches_take_the_same_steps(tiny_llama_dir):
    runs = {}
    for pack in (0, 64):
        learner = PolicyLearner(tiny_llama_dir, _cfg(lr=1e-3, micro_batch_size=2, pack_tokens=pack,
                                                     regularizer="gr", gr_gamma=1.0, gr_fd_eps=1e-2))
        start = _params(learner)
        rows = [learner.step(_batch(engine=[[-1.0] * len(r) for r in RESPONSES])) for _ in range(2)]
        runs[pack] = (_params(learner), rows, start)
    # Packed rows change the attention's summation order, and GR's finite difference (g2 - g1) / eps magnifies
    # it; Adam then moves a weight whose gradient is ~0 by up to lr whatever the gradient's size, so one such
    # weight can differ by several 1e-5 (8e-5 of 2048 on one CPU, 1e-6 on another). What must hold: the weights
    # moved the same way, their gap a tiny share of how far they moved.
    gap = torch.cat([(a - b).abs().flatten() for a, b in zip(runs[0][0], runs[64][0])])
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(runs[0][0], runs[0][2])])
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[64][2]))  # the same start
    assert gap.mean() < 1e-3 * moved.mean() and gap.max() < 0.1 * moved.max(), (gap.mean(), gap.max(), moved.mean())
    for a, b in zip(runs[0][1], runs[64][1]):
        for key in ("policy/loss", "policy/grad_norm", "gr/g2_norm", "policy/entropy", "policy/kl_to_initial"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
