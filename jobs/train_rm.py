"""Ray job entrypoint of `ray-crm train-rm`: python jobs/train_rm.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("train-rm", sys.argv[1:]))
