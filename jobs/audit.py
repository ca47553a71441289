"""Ray job entrypoint of `ray-crm audit`: python jobs/audit.py [--config FILE] [KEY=VALUE ...]"""
import sys

from ray_crm.cli import run_job

sys.exit(run_job("audit", sys.argv[1:]))
