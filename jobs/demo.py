"""Ray job entrypoint of `ray-crm demo`: python jobs/demo.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("demo", sys.argv[1:]))
