"""Ray job entrypoint of `ray-crm train-rl`: python jobs/train_rl.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("train-rl", sys.argv[1:]))
