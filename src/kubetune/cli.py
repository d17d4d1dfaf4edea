"""kubetune command line. Heavy imports live inside the commands so `--help` is instant."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional

from kubetune import __version__
from kubetune.errors import UserError


def _run(args: argparse.Namespace) -> int:
    from kubetune.config import load_config
    from kubetune.local import run_pipeline

    cfg = load_config(args.config, args.set)
    result = run_pipeline(cfg, progress=not args.no_progress)
    print()
    print(f"kubetune: run finished in {result['wall_seconds']:.0f} s")
    for stage, seconds in result["stage_seconds"].items():
        print(f"  {stage:<14} {seconds:7.1f} s")
    print(f"  {result['trainable_line']}")
    for key in ("eval.base_perplexity", "eval.tuned_perplexity", "eval.perplexity_change_pct"):
        if key in result["eval"]:
            print(f"  {key:<28} {result['eval'][key]}")
    print(f"registered model version: {result['registered']}" + (" (champion)" if result["champion"] else ""))
    print(f"adapter and checkpoints:  {result['storage']}")
    print(f"MLflow run {result['run_id']} in {result['tracking_uri']}")
    if not result["tracking_uri"].startswith("http"):
        print("  to browse it: kubetune services up, then open "
              f"http://127.0.0.1:5000/#/experiments/{result['experiment_id']}/runs/{result['run_id']}")
    else:
        print(f"  {result['tracking_uri'].rstrip('/')}/#/experiments/{result['experiment_id']}/runs/{result['run_id']}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from kubetune.pipelines.pipeline import COMPILED, compile_pipeline

    path = compile_pipeline(Path(args.output) if args.output else COMPILED)
    print(f"kubetune: pipeline compiled to {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from kubetune.config import load_config
    from kubetune.local import pin_locations
    from kubetune.preflight import check

    report = check(pin_locations(load_config(args.config, args.set)))
    print(f"kubetune: preflight passed: {report.data['rows']} rows, {report.model['architecture']} "
          f"({report.model['blocks']} blocks), MLflow {report.tracking_uri}, storage {report.storage_uri}")
    return 0


def _config(args: argparse.Namespace) -> int:
    import yaml

    from kubetune.config import describe, load_config, reference_markdown

    if args.markdown:
        print(reference_markdown())
        return 0
    if args.reference:
        for key, help_text, default in describe():
            print(f"{key:<34} {default!r:<40} {help_text}")
        return 0
    print(yaml.safe_dump(load_config(args.config, args.set).to_dict(), sort_keys=False), end="")
    return 0


def _services(args: argparse.Namespace) -> int:
    from kubetune import services

    if args.action == "up":
        url = services.services_up(port=args.port)
        print(f"kubetune: MLflow UI at {url}")
    elif args.action == "down":
        print("kubetune: MLflow server stopped" if services.services_down() else "kubetune: nothing was running")
    else:
        status = services.services_status()
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kubetune", description=__doc__)
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def config_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--config", help="YAML run config (default: the embedded demo config)")
        sub.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                         help="override one config value; repeatable")

    run = commands.add_parser("run", help="run the whole pipeline on this machine (kfp.local)")
    config_args(run)
    run.add_argument("--no-progress", action="store_true", help="plain log lines instead of progress bars")
    run.set_defaults(func=_run)

    check = commands.add_parser("check", help="run only the preflight checks")
    config_args(check)
    check.set_defaults(func=_check)

    config = commands.add_parser("config", help="print the effective config, or every key with its help")
    config_args(config)
    config.add_argument("--reference", action="store_true", help="list every key, its default and its help")
    config.add_argument("--markdown", action="store_true", help="the same reference as a Markdown table")
    config.set_defaults(func=_config)

    compile_ = commands.add_parser("compile", help="write the pipeline YAML for Kubeflow Pipelines")
    compile_.add_argument("--output", help="where to write it (default: pipelines/kubetune_pipeline.yaml)")
    compile_.set_defaults(func=_compile)

    services = commands.add_parser("services", help="a local MLflow server (UI included) in the background")
    services.add_argument("action", choices=["up", "status", "down"])
    services.add_argument("--port", type=int, default=5000)
    services.set_defaults(func=_services)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"kubetune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
