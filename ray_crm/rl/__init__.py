"""RL on Ray: rollout engines, reward actors, the GRPO learner and its driver.

Nothing is imported here, so the pure modules of this package stay free of Ray and vLLM imports:
- `grpo_trainer`: `ray-crm train-rl`, the driver: generate -> score -> learner step -> weight sync, checkpoints;
- `policy_learner` (no Ray): `PolicyLearner`, one regularized GRPO step (GR, KL, reference resets) per batch,
  as one rank of a DeepSpeed data-parallel group;
- `learner_group`: `LearnerGroup`, the learner's ranks as Ray actors in one placement group;
- `policy_losses` (pure): Dr.GRPO advantages, PPO-clip, k3 KL and the GR finite-difference gradient;
- `prompts`: the RL prompts from files (bad rows quarantined) or the VADER task's prompts;
- `rollout`: `RolloutPool` of `VLLMRolloutActor`s, `generate` and `sync_weights` (the learner's call);
- `vllm_engine`: one vLLM engine from `RolloutConfig` (CPU vs GPU settings), `PromptRollout` outputs;
- `weights` (pure): `policy_state_dict` (LoRA merged) and `PackedWeights` for the object store;
- `reward_actor`: `RewardPool` serving the trained RM, and gold scorers that only measure hacking;
- `supervision`: timeouts, restarts and one retry for every remote call;
- `batch_inference`: Ray Data path for offline evaluation (many samples per prompt over a test set).
"""
