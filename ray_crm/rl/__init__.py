"""RL on Ray: rollout engines, reward actors, the policy (and critic) learners and their driver.

Nothing is imported here, so the pure modules of this package stay free of Ray and vLLM imports:
- `grpo_trainer`: `ray-crm train-rl`, the driver: generate -> score -> learner step -> weight sync, checkpoints,
  held-out evaluation;
- `policy_learner` (no Ray): `PolicyLearner`, a batch's regularized PPO-clip updates (GR, KL, reference resets)
  as one rank of a DeepSpeed data-parallel group; `value_learner`: `ValueLearner`, PPO's critic beside it;
  both are `ray_crm.train.learner.DeepSpeedLearner`s, the learner layer every trained model stands on;
- `learner_group`: `LearnerGroup`, the learner's ranks as Ray actors in one placement group;
- `policy_losses` (pure): Dr.GRPO advantages, PPO-clip, the value loss, k3 KL and the GR finite-difference
  gradient; `advantages` (pure): RLOO, per-token rewards and GAE; `regularizers`: the registry by name;
- `monitor` (numpy): the reward-hacking monitor's Z measurements and alarm rules;
- `prompts`: the RL prompts from files (bad rows quarantined) or the VADER task's prompts;
- `rollout`: `RolloutPool` of `VLLMRolloutActor`s, `generate` and `sync_weights` (the learner's call);
- `vllm_engine`: one vLLM engine from `RolloutConfig` (CPU vs GPU settings), `PromptRollout` outputs;
- `weights` (pure): `policy_state_dict` (LoRA merged) and `PackedWeights` for the object store;
- `nccl_sync`: the GPU weight broadcast from learner rank 0 through vLLM's weight-transfer API;
- `reward_actor`: `RewardPool` serving the trained RM, and gold scorers that only measure hacking;
- `supervision`: timeouts, restarts and one retry for every remote call;
- `batch_inference`: Ray Data path for offline evaluation (many samples per prompt over a test set).
"""
