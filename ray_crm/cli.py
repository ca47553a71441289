"""`ray-crm`: parse, load the config, call a stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from ray_crm.config import ConfigError, load_config
from ray_crm.stages import STAGES, run_stage


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-crm",
        description="Causal reward models and gradient-regularised RLHF on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    assets = sub.add_parser("assets", help="fetch, convert and checksum the real models and data (once)")
    assets.add_argument("--only", nargs="*", help="asset names (default: all)")
    for stage in STAGES.values():
        p = sub.add_parser(stage.name, help=stage.help, description=stage.help)
        p.add_argument("--config", help="YAML config file (default: built-in defaults)")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. loss.lambda_mmd=0.3")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "assets":
        from ray_crm.assets import fetch_all

        for name, path in fetch_all(args.only).items():
            print(f"{name}: {path}")
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"ray-crm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from ray_crm.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    result = run_stage(args.command, cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
