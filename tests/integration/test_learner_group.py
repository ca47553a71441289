"""The learner on Ray + DeepSpeed (gloo): 2 ranks under ZeRO-2, and under ZeRO-3 (every weight sharded), step
as 1 rank under ZeRO-0 for every regularizer and hand the engines the same weights, and a checkpointed group
whose rank is killed resumes into the same next step. A planted batch (hand-made token ids, advantages, engine
log-probs) stands in for vLLM."""

from __future__ import annotations

import json

import pytest
import ray
import torch

from ray_crm.checkpoint import latest_verified, write_checkpoint
from ray_crm.config import validate
from ray_crm.rl.learner_group import LearnerGroup
from ray_crm.rl.policy_learner import PolicyBatch
from ray_crm.rl.supervision import ActorCallError

pytestmark = pytest.mark.integration

PROMPTS = [[1, 7, 9, 12], [1, 30], [1, 44, 45], [1, 8, 8, 8, 9]]
RESPONSES = [[40, 41, 42], [50, 51, 52, 53, 54, 55], [60], [70, 71, 72, 73]]
SCENARIOS = {
    "none": {"regularizer": "none"},
    "kl": {"regularizer": "kl", "kl_beta": 0.5},
    "gr": {"regularizer": "gr", "gr_gamma": 0.5, "gr_fd_eps": 1e-2, "gr_g_clip": 100.0},
    # GR's norm clip and DeepSpeed's gradient clipping both active
    "gr_clipped": {"regularizer": "gr", "gr_gamma": 0.5, "gr_fd_eps": 1e-2, "gr_g_clip": 0.1, "grad_clip": 0.05},
}


def _batch(sign: float) -> PolicyBatch:
    return PolicyBatch(PROMPTS, RESPONSES, [sign, -sign, 0.5 * sign, -0.5 * sign],
                       [[-1.0] * len(r) for r in RESPONSES], temperature=0.7, max_new_tokens=8)


def _cfg(policy, workers: int, zero: int, **rl):
    return validate({"ray": {"num_cpus": 2}, "rl": {
        "policy": str(policy), "num_workers": workers, "zero_stage": zero, "learner_cpus": 0.5, "lr": 1e-3,
        "micro_batch_size": 1, "lora": {"rank": 4, "alpha": 8}, **rl}})


@pytest.fixture(scope="module")
def groups(ray_local, tiny_llama_dir):
    """One rank under ZeRO-0 and two under ZeRO-2, started once; each scenario rebuilds their learners."""
    one = LearnerGroup(str(tiny_llama_dir), _cfg(tiny_llama_dir, 1, 0))
    two = LearnerGroup(str(tiny_llama_dir), _cfg(tiny_llama_dir, 2, 2))
    yield one, two
    one.close()
    two.close()


def _statistics(stats: dict) -> dict:
    """A step's statistics without its timings (`time/...`: each rank's own clock, different at every run)."""
    return {k: v for k, v in stats.items() if not k.startswith("time/")}


def _params(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """Rank 0's trainable tensors (under ZeRO-3 every rank takes part in gathering them)."""
    return group.call("params", during="reading the weights", ranks=group.holders)[0]


def _engine_weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    (ref,), partial = group.engine_weights(torch.float32, during="sync", timeout_s=60)
    assert partial  # LoRA: the merged target modules only
    return {name: t.clone() for name, t in ray.get(ref).tensors()}


# ZeRO-2 for every scenario; ZeRO-3 for each regularizer (clipping does not depend on the stage)
CASES = [(scenario, 2) for scenario in SCENARIOS] + [(scenario, 3) for scenario in ("none", "kl", "gr")]


@pytest.mark.parametrize(("scenario", "zero"), CASES)
def test_two_ranks_under_zero_step_as_one_rank(groups, tiny_llama_dir, scenario, zero):
    one, two = groups
    for group, (workers, stage) in ((one, (1, 0)), (two, (2, zero))):
        group.setup(str(tiny_llama_dir), _cfg(tiny_llama_dir, workers, stage, **SCENARIOS[scenario]).rl)
    start = _params(one)
    for sign in (1.0, -1.0):
        solo = one.step(_batch(sign), during="step")
        both = two.call("step", _batch(sign), during="step")
        assert _statistics(both[0]) == _statistics(both[1])  # every rank reports the global statistics
        assert solo["skipped"] == both[0]["skipped"] == 0.0
        for key in ("policy/loss", "policy/grad_norm", "policy/engine_logprob_gap", "policy/response_tokens",
                    *(k for k in solo if k.startswith(("gr/", "policy/kl")))):
            assert both[0][key] == pytest.approx(solo[key], rel=1e-4, abs=1e-7), key
    a, b = _params(one), _params(two)
    assert any((a[n] - start[n]).abs().max() > 1e-4 for n in a)  # the steps moved the policy
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-5, rtol=0, msg=name)
    # rank 1 holds the same weights (ZeRO-2 all-gathers its partition back; ZeRO-3 gathers them to read)
    assert all(torch.equal(t, b[n]) for n, t in two.call("params", during="read")[1].items())
    solo_sync, both_sync = _engine_weights(one), _engine_weights(two)  # under ZeRO-3 every rank helps gather
    assert solo_sync.keys() == both_sync.keys()
    for name, tensor in solo_sync.items():
        torch.testing.assert_close(both_sync[name], tensor, atol=1e-5, rtol=0, msg=name)


@pytest.mark.parametrize("zero", [2, 3])
def test_a_checkpointed_group_killed_and_restarted_takes_the_same_next_step(ray_local, tiny_llama_dir, tmp_path, zero):
    # its own group (the test kills one of its ranks), small enough to fit beside the module's: 2 x 0.25 CPU
    cfg = _cfg(tiny_llama_dir, 2, zero, learner_cpus=0.25, **SCENARIOS["kl"])
    two = LearnerGroup(str(tiny_llama_dir), cfg)
    two.step(_batch(1.0), during="step 1")
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        write_checkpoint(root, f"step_{step:06d}", lambda folder: two.save(folder, during="checkpointing"))
    files = sorted(p.name for p in (root / "step_000002").iterdir())
    assert {"optim_rank0.json", "optim_rank1.safetensors", "params.safetensors", "reference.safetensors"} <= set(files)
    assert json.loads((root / "step_000002" / "learner.json").read_text())["step"] == 1
    expected = two.step(_batch(-1.0), during="step 2")
    after = _params(two)

    ray.kill(two.actors.members[1].handle, no_restart=True)
    with pytest.raises(ActorCallError, match=r"step 3: learner rank 1 died during step"):
        two.step(_batch(1.0), during="step 3")
    two.close()

    shard = root / "step_000002" / "optim_rank1.safetensors"  # a checkpoint cut short is passed over
    shard.write_bytes(shard.read_bytes()[:100])
    resumed_from = latest_verified(root)
    assert resumed_from == root / "step_000001"
    with LearnerGroup(str(tiny_llama_dir), cfg) as again:
        again.load(resumed_from, during="resuming")
        assert _statistics(again.step(_batch(-1.0), during="step 2 again")) == _statistics(expected)
        assert all(torch.equal(t, after[n]) for n, t in _params(again).items())
