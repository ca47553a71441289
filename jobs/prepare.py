"""Ray job entrypoint of `ray-crm prepare`: python jobs/prepare.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("prepare", sys.argv[1:]))
