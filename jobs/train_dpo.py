"""Ray job entrypoint of `ray-crm train-dpo`: python jobs/train_dpo.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("train-dpo", sys.argv[1:]))
