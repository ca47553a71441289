"""Training on preference pairs, and the learner layer every trained model stands on.

- `learner`: `DeepSpeedLearner`, one rank's DeepSpeed engine (ZeRO 0-3) and the checkpoint format of every stage
  (no Ray): `rm_trainer` steps it on Ray Train workers, `ray_crm.rl` on its learner actors;
- `rm_trainer`: `train-rm` and `train-dpo` on Ray Train (the pair losses, validation, checkpoints, export);
- `deepspeed_config`: the engines' configs, CPU (fp32, gloo) or GPU (bf16, NCCL);
- `reference_logps`: DPO's reference log-probs, precomputed once with Ray Data;
- `metrics_log`, `metric_names`: the step logs and which way each validation metric is better.
"""
