"""Ray job entrypoint of `ray-crm sweep`: python jobs/sweep.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("sweep", sys.argv[1:]))
