"""kubetune: fine-tune a language model as a Kubeflow Pipelines DAG, on this machine or on a cluster."""

# The top layer: it parses arguments and calls the library and kubetune.launch; nothing imports it.

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional

import yaml

from kubetune import __version__, console, services
from kubetune.config_reference import describe, reference_markdown
from kubetune.errors import Interrupted, StageFailed, UserError, redacted
from kubetune.export import export
from kubetune.preflight import preflight
from kubetune.headline import headline_keys, number
from kubetune.run_config import load_config, named
from kubetune.tracking import embedded_uri, resolve_uri
from kubetune.tasks import get_task

# kubetune.launch and kubetune.pipelines (the KFP layer) are imported by the commands that use them:
# importing the pipeline builds the DAG with kfp, about 1.5 s that `--help` or `config` need not pay.


WHEN_DATA_CHANGES_HELP = ("train only when the data differs (sha256 of its content) from what the current champion was "
                          "trained on; otherwise the run ends after preflight, recorded as skipped, no GPU asked for")


def _run(args: argparse.Namespace) -> int:
    from kubetune.launch.local import browse_hint, run_pipeline

    cfg = named(load_config(args.config, args.set), args.run_name, args.set)
    print(f"kubetune: {cfg.tracking.run_name or cfg.register.model_name}: {cfg.task} on {cfg.model.name_or_path} "
          f"({cfg.model.technique()}); preflight checks the config, the data and the model first", flush=True)
    result = run_pipeline(cfg, progress=not args.no_progress, runner=args.runner, resume=args.resume or "",
                          verbose=args.verbose, when_data_changes=args.when_data_changes)
    print()
    if "skipped" in result:
        print(f"kubetune: {result['skipped']} ({result['wall_seconds']:.0f} s)")
        print(f"MLflow run {result['run_id']} in {result['tracking_uri']}")
        print(f"  {browse_hint(result['tracking_uri'], result['experiment_id'], result['run_id'])}")
        return 0
    print(f"kubetune: run finished in {result['wall_seconds']:.0f} s")
    for stage, seconds in result["stage_seconds"].items():
        print(f"  {stage:<14} {seconds:7.1f} s")
    print(f"  {result['trainable_line']}")
    for key in headline_keys(get_task(cfg.task).headline_metrics):
        if key in result["eval"]:
            print(f"  {key:<34} {number(result['eval'][key])}")
    print(f"registered model version: {result['registered']}")
    if result["decision"]:
        print(f"  {result['decision']}")
    print(f"adapter and checkpoints:  {result['storage']}")
    print(f"MLflow run {result['run_id']} in {result['tracking_uri']}")
    print(f"  the run's whole log: {result['log']} (and logs/run.log in the MLflow run)")
    print(f"  {browse_hint(result['tracking_uri'], result['experiment_id'], result['run_id'])}")
    return 0


def _compile(args: argparse.Namespace) -> int:
    from kubetune.pipelines.pipeline import COMPILED, compile_pipeline

    path = compile_pipeline(Path(args.output) if args.output else COMPILED)
    print(f"kubetune: pipeline compiled to {path}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from kubetune.launch.local import pin_locations

    report = preflight(pin_locations(load_config(args.config, args.set)))
    print(f"kubetune: preflight passed: all {report.data['rows']} records checked ({report.data['train_rows']} train / "
          f"{report.data['validation_rows']} validation), {report.model['architecture']} "
          f"({report.model['blocks']} blocks), MLflow {report.tracking_uri}, storage {report.storage_uri}")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(reference_markdown())
        return 0
    if args.reference:
        for key, help_text, default in describe():
            print(f"{key:<34} {default!r:<40} {help_text}")
        return 0
    print(yaml.safe_dump(load_config(args.config, args.set).to_dict(), sort_keys=False), end="")
    return 0


def _export(args: argparse.Namespace) -> int:
    done = export(args.tracking_uri, args.model, Path(args.out), dtype=args.dtype, register_as=args.register,
                  endpoint_url=args.endpoint_url)
    print(f"kubetune: {done.source_uri} merged into {done.base_model}: {done.path} ({done.bytes / 1e6:.1f} MB)")
    print("  load it with: transformers.AutoModelFor...from_pretrained(" + repr(str(done.path)) + ")")
    if done.registered:
        print(f"registered model version: {done.registered} (MLflow transformers flavor)")
    return 0


def _services(args: argparse.Namespace) -> int:
    if args.action == "up":
        store = args.store or (resolve_uri(load_config(args.config, args.set).tracking.mlflow_uri)
                               if args.config or args.set else None)
        url = services.services_up(port=args.port, store=store)
        print(f"kubetune: MLflow UI at {url}, serving {store or embedded_uri()}")
    elif args.action == "down":
        print("kubetune: MLflow server stopped" if services.services_down() else "kubetune: nothing was running")
    else:
        status = services.services_status()
        for key, value in status.items():
            print(f"{key}: {value}")
    return 0


def _cluster_command(args: argparse.Namespace) -> int:
    """submit, retrain and schedule: validate everything here, then send (kubetune.launch.cluster)."""
    from kubetune.launch import cluster

    cfg = load_config(args.config, args.set)  # bad input ends here: nothing has been sent
    connection = cluster.Connection.resolve(args.host, args.token, args.namespace)
    accelerators = cluster.Accelerators(args.accelerator_type, args.accelerator_count,
                                        cluster.parse_node_selector(args.gpu_node_selector))
    experiment = args.experiment or cfg.tracking.experiment
    patience = _patience(args) if getattr(args, "wait", False) else None
    if args.command == "schedule":
        done = cluster.schedule(connection, cfg, args.name, args.cron, accelerators, experiment, args.max_concurrency,
                                args.service_account, args.when_data_changes)
        what = f"recurring run {args.name!r} ({cluster.check_cron(args.cron)})" + (
            f", replacing {', '.join(done.replaced)}" if done.replaced else "")
    else:
        done = cluster.submit(connection, cfg, accelerators, experiment, getattr(args, "run_name", None),
                              prefix="retrain-" if args.command == "retrain" else "",
                              service_account=args.service_account, when_data_changes=args.when_data_changes)
        what = f"run {done.run_name}"
    print(f"kubetune: pipeline version {done.version_name} " + ("uploaded" if done.uploaded else "already there"))
    print(f"kubetune: {what} in experiment {experiment!r}")
    print(done.url, flush=True)
    if patience is None:
        return 0
    from kubetune.launch.follow import follow

    return follow(cluster.client(connection), connection, done.run_id, patience,
                  _mlflow_uri(cfg.tracking.mlflow_uri))


def _patience(args: argparse.Namespace):
    from kubetune.launch.follow import Patience, seconds

    return Patience(poll_seconds=args.poll_seconds, wait_timeout=seconds("--wait-timeout", args.wait_timeout),
                    outage=seconds("--outage-patience", args.outage_patience))


def _mlflow_uri(configured: Optional[str]) -> Optional[str]:
    """The MLflow store of cluster runs: the config's, else $MLFLOW_TRACKING_URI; never the embedded
    store of this machine, which holds no cluster run."""
    return resolve_uri(configured) if configured or os.environ.get("MLFLOW_TRACKING_URI") else None


def _configured_mlflow(args: argparse.Namespace) -> Optional[str]:
    return _mlflow_uri(load_config(args.config, args.set).tracking.mlflow_uri if args.config or args.set else None)


def _run_command(args: argparse.Namespace) -> int:
    """wait, runs, logs and cancel: runs already on the cluster (kubetune.launch.kfp_runs, .follow)."""
    from kubetune.launch import cluster, kfp_runs
    from kubetune.launch.follow import follow

    connection = cluster.Connection.resolve(args.host, args.token, args.namespace)
    if args.command == "wait":
        patience, mlflow_uri = _patience(args), _configured_mlflow(args)  # bad input ends here
        return follow(cluster.client(connection), connection, args.run_id, patience, mlflow_uri)
    if args.command == "runs":
        from kubetune.pipelines.pipeline import PIPELINE_NAME

        mlflow_uri = _configured_mlflow(args)
        runs = kfp_runs.recent_runs(cluster.client(connection), connection, args.limit, args.experiment)
        if not runs:
            print(f"kubetune: no runs of the pipeline {PIPELINE_NAME!r} at {connection.host}"
                  + (f" in experiment {args.experiment!r}" if args.experiment else ""))
            return 0
        facts, why = kfp_runs.mlflow_facts(mlflow_uri, [r.run_id for r in runs]) if mlflow_uri else ({}, "")
        kfp_runs.print_runs(runs, facts)
        if not mlflow_uri:
            print("kubetune: MLflow columns empty: name the store with --set tracking.mlflow_uri=URI, a --config "
                  "that names it, or $MLFLOW_TRACKING_URI", file=sys.stderr)
        elif why:
            print(f"kubetune: MLflow at {redacted(mlflow_uri)} was not reachable, its columns are empty: {why}",
                  file=sys.stderr)
        return 0
    kfp_client = cluster.client(connection)
    if args.command == "cancel":
        state, sent = kfp_runs.cancel(kfp_client, connection, args.run_id)
        print(f"kubetune: run {args.run_id} is being canceled ({state}); `kubetune wait {args.run_id}` follows it"
              if sent else f"kubetune: run {args.run_id} has already ended or is ending ({state}): nothing to cancel")
        return 0
    run = kfp_runs.get_run(kfp_client, connection, args.run_id)
    if args.stage is None:
        kfp_runs.print_stages(run, args.run_id)
        return 0
    kfp_runs.print_log(kfp_client, connection, args.run_id, kfp_runs.stage_named(run, args.run_id, args.stage))
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
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--verbose", action="store_true",
                     help="show every line the stages and kfp.local write (always in the run's log file)")
    run.add_argument("--resume", metavar="RUN_ID",
                     help="continue the MLflow run of a `kubetune run` that died (same --config/--set): its "
                          "stages run again, training from the run's last stored checkpoint")
    run.add_argument("--run-name", help="the MLflow run's name, what chart legends show (default: the model name "
                                        "and the --set values, else the start time)")
    run.add_argument("--when-data-changes", action="store_true", help=WHEN_DATA_CHANGES_HELP)
    run.add_argument("--runner", choices=["process", "container"], default="process",
                     help="process: each stage a Python process in this environment (default); container: each "
                          "stage in its component's image, through podman (build them with make images-local)")
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

    def connection_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", help="Kubeflow Pipelines URL, e.g. https://kubeflow.example.com/pipeline "
                                        "(default: $KF_PIPELINES_ENDPOINT)")
        sub.add_argument("--token", help="bearer token for the KFP API (default: $KF_PIPELINES_TOKEN)")
        sub.add_argument("--namespace", help="your profile namespace on a multi-user Kubeflow")

    def follow_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--poll-seconds", type=float, default=10.0,
                         help="seconds between looks at the run (default: 10)")
        sub.add_argument("--wait-timeout", metavar="DURATION",
                         help="stop following after this long, exit 4: 90, 90s, 30m, 6h, 2d (default: until it ends)")
        sub.add_argument("--outage-patience", metavar="DURATION", default="15m",
                         help="how long the KFP API may not answer before giving up with exit 4; retried with backoff "
                              "meanwhile (default: 15m)")

    def cluster_args(sub: argparse.ArgumentParser) -> None:
        config_args(sub)
        connection_args(sub)
        sub.add_argument("--experiment", help="KFP experiment (default: tracking.experiment)")
        sub.add_argument("--service-account", help="Kubernetes service account of the run's pods, e.g. "
                                                   "kubetune-pipeline (default: KFP's own)")
        sub.add_argument("--accelerator-type", help="GPU resource name (default: nvidia.com/gpu)")
        sub.add_argument("--accelerator-count", type=int,
                         help="GPUs for prepare_model and evaluate; 0 runs every stage without GPUs (default: 1). "
                              "train gets one per training process: train.processes in the config")
        sub.add_argument("--gpu-node-selector", action="append", default=[], metavar="KEY=VALUE",
                         help="node label the GPU stages need; repeatable (default: nvidia.com/gpu.present=true)")
        sub.add_argument("--when-data-changes", action="store_true", help=WHEN_DATA_CHANGES_HELP)

    def wait_args(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--wait", action="store_true",
                         help="follow the run: print each stage's state changes, exit with the outcome (0 succeeded, "
                              "1 failed, 3 canceled, 4 not seen to finish)")
        follow_args(sub)

    submit = commands.add_parser("submit", help="run the pipeline on a Kubeflow Pipelines cluster")
    cluster_args(submit)
    submit.add_argument("--run-name", help="name of the run (default: <register.model_name>-<UTC time>)")
    wait_args(submit)
    submit.set_defaults(func=_cluster_command)

    retrain = commands.add_parser("retrain", help="a one-off cluster run with overrides (run name retrain-...)")
    cluster_args(retrain)
    wait_args(retrain)
    retrain.set_defaults(func=_cluster_command)

    schedule = commands.add_parser("schedule", help="a recurring cluster run; the same --name replaces it")
    cluster_args(schedule)
    schedule.add_argument("--cron", required=True,
                          help="standard 5-field cron, as a Kubernetes CronJob reads it (minute hour day-of-month "
                               "month day-of-week): '0 3 * * *' = 03:00 daily, '0 3 * * mon'; or @hourly, @daily, "
                               "@weekly, @monthly, @yearly")
    schedule.add_argument("--name", required=True, help="name of the recurring run")
    schedule.add_argument("--max-concurrency", type=int, default=1, help="runs of it at the same time (default: 1)")
    schedule.set_defaults(func=_cluster_command)

    wait = commands.add_parser("wait", help="follow a cluster run to its end; the exit code is its outcome",
                               description="Exit code: 0 succeeded, 1 failed, 3 canceled, 4 not seen to finish, 2 bad "
                                           "input. --config/--set only name the MLflow store (tracking.mlflow_uri), "
                                           "where a failed run's error line is read when KFP has none.")
    wait.add_argument("run_id", metavar="RUN_ID")
    connection_args(wait)
    follow_args(wait)
    config_args(wait)  # only for tracking.mlflow_uri: a failed run's error line from MLflow
    wait.set_defaults(func=_run_command)

    runs = commands.add_parser("runs", help="recent cluster runs of the pipeline, with their MLflow run and version",
                               description="--config/--set only name the MLflow store (tracking.mlflow_uri), else "
                                           "$MLFLOW_TRACKING_URI.")
    connection_args(runs)
    runs.add_argument("--limit", type=int, default=20, help="how many runs, newest first (default: 20)")
    runs.add_argument("--experiment", help="only this KFP experiment's runs (default: every experiment)")
    config_args(runs)  # only for tracking.mlflow_uri (else $MLFLOW_TRACKING_URI)
    runs.set_defaults(func=_run_command)

    logs = commands.add_parser("logs", help="a stage's log of a cluster run (without --stage: its stages)")
    logs.add_argument("run_id", metavar="RUN_ID")
    logs.add_argument("--stage", help="the stage, e.g. train or prepare-data")
    connection_args(logs)
    logs.set_defaults(func=_run_command)

    cancel = commands.add_parser("cancel", help="stop a cluster run (KFP terminate)")
    cancel.add_argument("run_id", metavar="RUN_ID")
    connection_args(cancel)
    cancel.set_defaults(func=_run_command)

    export = commands.add_parser("export", help="merge a registered adapter into its base: a standalone model folder")
    export.add_argument("--model", required=True, metavar="NAME/VERSION",
                        help="the registered version (NAME/VERSION, NAME@ALIAS, a run id or a models:/ URI)")
    export.add_argument("--out", required=True, help="a new or empty folder to write the merged model to")
    export.add_argument("--dtype", default="float32", help="weights of the merged model: float32 (default), "
                                                           "bfloat16 or float16")
    export.add_argument("--register", metavar="NAME", help="also register the merged model under NAME (MLflow "
                                                           "transformers flavor: loads without kubetune)")
    export.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the "
                                               "state folder's store, as `kubetune run` uses)")
    export.add_argument("--endpoint-url", help="S3 endpoint for an s3:// base model (MinIO and the like)")
    export.set_defaults(func=_export)

    services = commands.add_parser("services", help="a local MLflow server (UI included) in the background")
    services.add_argument("action", choices=["up", "status", "down"])
    services.add_argument("--port", type=int, default=5000)
    services.add_argument("--store", metavar="URI", help="the sqlite store to serve, as tracking.mlflow_uri names it "
                                                       "(default: the state folder's, or the one --config names)")
    config_args(services)
    services.set_defaults(func=_services)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    console.setup()
    try:
        return args.func(args)
    except (UserError, StageFailed) as exc:
        print(f"kubetune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except Interrupted as exc:
        print(f"kubetune: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kubetune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
