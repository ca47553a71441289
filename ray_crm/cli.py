"""`ray-crm` and the jobs/ entrypoints: parse, load the config, call a stage. Nothing else lives here."""

from __future__ import annotations

import argparse
import json
import sys

from ray_crm import jobs_client
from ray_crm.config import BENCHMARKS, ConfigError, load_config
from ray_crm.runtime import keep_local_cluster_on_loopback
from ray_crm.stages import STAGES, run_stage


def add_stage_arguments(p: argparse.ArgumentParser) -> None:
    """What every stage takes, whether run here (`ray-crm STAGE`) or as a job (`ray-crm submit STAGE`)."""
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. loss.lambda_mmd=0.3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")


def add_eval_aliases(p: argparse.ArgumentParser, stage: str) -> None:
    """`--model` / `--bench` / `--resume`: thin aliases of eval.models / bench.names / sweep.resume for the
    stages that read them."""
    if stage == "sweep":
        p.add_argument("--resume", action="store_true",
                       help="continue the interrupted sweep of the same name (sets sweep.resume=true)")
    if stage == "demo":
        p.add_argument("-v", "--verbose", action="store_true",
                       help="show every stage's output (Ray logs, progress bars) instead of one line per stage")
    if stage in ("eval", "audit"):
        p.add_argument("--model", action="append", metavar="[LABEL=]DIR",
                       help="a reward model folder to score, repeatable (sets eval.models)")
    if stage in ("bench", "eval", "audit"):
        p.add_argument("--bench", action="extend", type=_bench_names, metavar="NAME[,NAME...]",
                       help=f"benchmarks to use, repeatable or comma-separated: {', '.join(BENCHMARKS)} "
                            "(sets bench.names)")


def add_all_stage_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    add_stage_arguments(p)
    add_eval_aliases(p, stage)


def _bench_names(text: str) -> list[str]:
    """A comma list rather than nargs='+', which would swallow the KEY=VALUE overrides after it."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    return names


def alias_overrides(args: argparse.Namespace) -> list[str]:
    out = []
    if getattr(args, "model", None):
        out.append("eval.models=" + json.dumps(args.model))
    if getattr(args, "bench", None):
        out.append("bench.names=" + json.dumps(args.bench))
    if getattr(args, "resume", False):
        out.append("sweep.resume=true")
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ray-crm",
        description="Causal reward models and gradient-regularised RLHF on Ray.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    assets = sub.add_parser("assets", help="fetch, convert and checksum the real models and data (once)")
    assets.add_argument("--only", nargs="*", help="asset names (default: all)")
    for stage in STAGES.values():
        add_all_stage_arguments(sub.add_parser(stage.name, help=stage.help, description=stage.help), stage.name)
    jobs_client.add_parsers(sub, add_all_stage_arguments)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "assets":
        from ray_crm.assets import fetch_all

        for name, path in fetch_all(args.only).items():
            print(f"{name}: {path}")
        return 0
    if args.command in jobs_client.COMMANDS:
        return jobs_client.run_command(args, alias_overrides(args))
    try:
        cfg = load_config(args.config, args.overrides + alias_overrides(args))
    except ConfigError as exc:
        print(f"ray-crm {args.command}: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from ray_crm.config import dump_config

        print(dump_config(cfg), end="")
        return 0
    keep_local_cluster_on_loopback(cfg.ray)
    result = run_stage(args.command, cfg, **({"verbose": args.verbose} if args.command == "demo" else {}))
    if args.command != "demo":  # the demo ends with its own tables, which name the same files
        print(json.dumps(result, indent=2, default=str))
    return 0


def run_job(stage: str, argv: list[str]) -> int:
    """Entry of jobs/<stage>.py: the stage's own CLI, given the config file that `submit` shipped, if any."""
    path = jobs_client.shipped_config_path()
    return main([stage, *(["--config", str(path)] if path else []), *argv])


if __name__ == "__main__":
    sys.exit(main())
