"""Ray job entrypoint of `ray-crm bench`: python jobs/bench.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("bench", sys.argv[1:]))
