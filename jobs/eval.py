"""Ray job entrypoint of `ray-crm eval`: python jobs/eval.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("eval", sys.argv[1:]))
