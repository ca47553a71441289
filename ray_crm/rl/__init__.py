"""RL on Ray: rollout engines, reward actors and (later) the PPO/GRPO learner and driver.

Nothing is imported here, so the pure modules of this package stay free of Ray and vLLM imports:
- `rollout`: `RolloutPool` of `VLLMRolloutActor`s, `generate` and `sync_weights` (the learner's call);
- `vllm_engine`: one vLLM engine from `RolloutConfig` (CPU vs GPU settings), `PromptRollout` outputs;
- `policy_losses` (pure): Dr.GRPO advantages, PPO-clip, k3 KL and the GR finite-difference gradient;
- `weights` (pure): `policy_state_dict` (LoRA merged) and `PackedWeights` for the object store;
- `reward_actor`: `RewardPool` serving the trained RM, and gold scorers that only measure hacking;
- `supervision`: timeouts, restarts and one retry for every remote call;
- `batch_inference`: Ray Data path for offline evaluation (many samples per prompt over a test set).
"""
