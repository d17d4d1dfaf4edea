"""`kubetune submit | retrain | schedule`: the pipeline on a Kubeflow Pipelines cluster.

Everything the command can check is checked here before one request is sent: the run config
(load_config, the same validation as `kubetune run`), that a pod can reach every location it names,
the accelerator parameters and the cron expression (5 fields, as the retrain CronJob's: cron.py).
Then kfp.Client speaks KFP's REST API (v2beta1):

- the pipeline is compiled from this installed version and uploaded under the stable name
  `kubetune`: the first time as the pipeline, later as a new version of it. A version is named after
  the package version and a hash of the compiled YAML, so submitting unchanged code reuses it.
- the experiment (default: tracking.experiment) is found by name or created;
- a run, or a recurring run, of that pipeline version with the whole config as `config_json` and
  the accelerator parameters.

KFP's v2beta1 API has no update for recurring runs, so `schedule` with a name that exists creates
the new recurring run first and then deletes the old one(s) of that name: the schedule is never
lost, and afterwards exactly one recurring run has the name (its id changes).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import io
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

from kubetune import __version__
from kubetune.config import RunConfig
from kubetune.errors import ConfigError, ServiceError
from kubetune.launch.cron import check_cron, kfp_cron
from kubetune.pipelines import pipeline
from kubetune.run_form import check_for_cluster

log = logging.getLogger(__name__)

TOKEN_ENV = "KF_PIPELINES_TOKEN"  # kubetune's own: kfp.Client reads no token from the environment
TOKEN_FILE_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own: a projected ServiceAccount token, in a pod
TOKEN_FILE = "/var/run/secrets/kubeflow/pipelines/token"  # kfp's default place for it
HOST_ENV = "KF_PIPELINES_ENDPOINT"  # kfp.Client's own
UI_HOST_ENV = "KF_PIPELINES_UI_ENDPOINT"  # kfp.Client's own
PAGE_SIZE = 100


@dataclass(frozen=True)
class Connection:
    """Where Kubeflow Pipelines answers and who we are there: a bearer token (--token,
    $KF_PIPELINES_TOKEN), else in a pod the projected ServiceAccount token file that multi-user KFP
    accepts ($KF_PIPELINES_SA_TOKEN_PATH, or kfp's default path where it exists; re-read per request,
    as the kubelet rotates it), else no credentials (a port-forward or a single-user KFP)."""

    host: str
    token: Optional[str] = None
    namespace: Optional[str] = None
    token_file: Optional[str] = None

    @classmethod
    def resolve(cls, host: Optional[str], token: Optional[str] = None,
                namespace: Optional[str] = None) -> "Connection":
        host = host or os.environ.get(HOST_ENV)
        if not host:
            raise ConfigError("--host", None, f"give the Kubeflow Pipelines URL (or set {HOST_ENV}), e.g. "
                                              "http://localhost:8080 for a port-forward to ml-pipeline-ui")
        if not host.startswith(("http://", "https://")):
            raise ConfigError("--host", host, f"give the URL with its scheme: https://{host} or http://{host}")
        token = token or os.environ.get(TOKEN_ENV) or None
        token_file = None
        if token is None:
            token_file = os.environ.get(TOKEN_FILE_ENV) or (TOKEN_FILE if Path(TOKEN_FILE).is_file() else None)
        return cls(host=host.rstrip("/"), token=token, namespace=namespace or None, token_file=token_file)

    @property
    def ui(self) -> str:
        """Base URL of the KFP UI (where the links point): the API host unless told otherwise."""
        return (os.environ.get(UI_HOST_ENV) or self.host).rstrip("/")


@dataclass(frozen=True)
class Accelerators:
    """The pipeline's cluster parameters (see pipelines/pipeline.py for what each one sizes)."""

    type: Optional[str] = None
    count: Optional[int] = None
    node_selector: Optional[dict[str, str]] = None

    def parameters(self) -> dict[str, Any]:
        values = {
            "accelerator_type": self.type if self.type is not None else pipeline.ACCELERATOR_TYPE,
            "accelerator_count": self.count if self.count is not None else pipeline.ACCELERATOR_COUNT,
            "gpu_node_selector": (self.node_selector if self.node_selector is not None
                                  else dict(pipeline.GPU_NODE_SELECTOR)),
        }
        if not values["accelerator_type"].strip():
            raise ConfigError("--accelerator-type", values["accelerator_type"],
                              "name the extended resource, e.g. nvidia.com/gpu or amd.com/gpu")
        if values["accelerator_count"] < 0:
            raise ConfigError("--accelerator-count", values["accelerator_count"], "give 0 or more accelerators per pod")
        return values


def parse_node_selector(items: list[str]) -> Optional[dict[str, str]]:
    """`--gpu-node-selector KEY=VALUE` (repeatable) to a dict; none given keeps the pipeline's default."""
    if not items:
        return None
    selector = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--gpu-node-selector", item,
                              "write KEY=VALUE, e.g. --gpu-node-selector cloud.google.com/gke-accelerator=nvidia-l4")
        selector[key.strip()] = value.strip()
    return selector


# ---------------------------------------------------------------------------------------------
# Checks before anything is sent.


def run_parameters(cfg: RunConfig, accelerators: Accelerators, when_data_changes: bool = False) -> dict[str, Any]:
    """The pipeline parameters of a run: the validated config as one JSON string, plus the GPUs, and
    when_data_changes where asked (train only on data the champion was not trained on)."""
    return {"config_json": json.dumps(cfg.to_dict()), **accelerators.parameters(),
            **({"when_data_changes": True} if when_data_changes else {})}


def run_name(cfg: RunConfig, prefix: str = "") -> str:
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{prefix}{cfg.register.model_name}-{stamp}"


# ---------------------------------------------------------------------------------------------
# Talking to Kubeflow Pipelines.


@dataclass
class Submitted:
    """What the cluster now holds for this command."""

    url: str
    experiment_id: str
    pipeline_id: str
    version_id: str
    version_name: str
    uploaded: bool
    run_id: Optional[str] = None
    run_name: Optional[str] = None
    recurring_run_id: Optional[str] = None
    replaced: list[str] = field(default_factory=list)


def _kfp_output(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """kfp.Client prints links on stdout; keep stdout for our own lines and log theirs."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = call(*args, **kwargs)
    for line in buffer.getvalue().splitlines():
        log.debug("kfp: %s", line)
    return result


@contextlib.contextmanager
def api_errors(connection: Connection, doing: str) -> Iterator[None]:
    """HTTP failures as one-line errors that say what to do."""
    import kfp_server_api
    import urllib3

    try:
        yield
    except kfp_server_api.ApiException as exc:
        if exc.status in (401, 403):
            field_name, value = ((TOKEN_FILE_ENV, connection.token_file) if connection.token_file
                                 else ("--token", "<hidden>" if connection.token else None))
            raise ServiceError(field_name, value,
                               f"Kubeflow Pipelines at {connection.host} refused to {doing} (HTTP {exc.status}): "
                               f"pass --token or set {TOKEN_ENV} to a token it accepts"
                               + ("" if connection.namespace else ", and --namespace for a multi-user cluster")) from None
        body = response_body(exc)
        raise ServiceError("--host", connection.host, f"Kubeflow Pipelines refused to {doing}: HTTP {exc.status} "
                                                      f"{exc.reason}: {body[:300]}") from None
    except (urllib3.exceptions.HTTPError, TimeoutError, OSError) as exc:
        raise ServiceError("--host", connection.host, f"Kubeflow Pipelines does not answer ({type(exc).__name__}); "
                                                      "check the URL and that the API is reachable from here") from None


def response_body(exc) -> str:
    """The text of a refused request's answer (kfp_server_api.ApiException.body: bytes or str)."""
    return (exc.body.decode(errors="replace") if isinstance(exc.body, bytes) else str(exc.body or "")).strip()


@contextlib.contextmanager
def quiet_retries() -> Iterator[None]:
    """urllib3 logs a WARNING for each connection retry, three per request to a server that is away,
    before the one-line error (or follow's one line per outage) that says so."""
    logger = logging.getLogger("urllib3.connectionpool")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def client(connection: Connection):
    """A kfp.Client for the connection. Without --namespace it asks /healthz whether KFP is multi-user."""
    import kfp
    from kfp.client import ServiceAccountTokenVolumeCredentials

    class Client(kfp.Client):
        def get_kfp_healthz(self, sleep_duration: int = 5):
            # kfp.Client tries 5 times, 5 s apart, and then reports a timeout even for a refused token;
            # one try lets the real answer (401, 404, ...) surface at once as a one-line error.
            return self._healthz_api.healthz_service_get_healthz()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # "This client only works with ... v2.0.0-beta.2 and later"
        with api_errors(connection, "answer /apis/v2beta1/healthz"), quiet_retries():
            credentials = ServiceAccountTokenVolumeCredentials(connection.token_file) if connection.token_file else None
            return _kfp_output(Client, host=connection.host, existing_token=connection.token, credentials=credentials,
                               namespace=connection.namespace or "kubeflow")


def name_filter(name: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]})


def _compiled(directory: Path) -> tuple[Path, str]:
    """The pipeline compiled from this installed code, and its version name (package version + hash)."""
    path = pipeline.compile_pipeline(directory / f"{pipeline.PIPELINE_NAME}.yaml")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return path, f"{pipeline.PIPELINE_NAME}-{__version__}-{digest}"


def _pipeline_version(kfp_client, connection: Connection, package: Path, version_name: str) -> tuple[str, str, str, bool]:
    """(pipeline id, version id, version name, uploaded?) of the compiled pipeline on the cluster."""
    found = kfp_client.list_pipelines(filter=name_filter(pipeline.PIPELINE_NAME), namespace=connection.namespace)
    if not found.pipelines:
        created = _kfp_output(kfp_client.upload_pipeline, str(package), pipeline_name=pipeline.PIPELINE_NAME,
                              description="kubetune: fine-tune a language model (uploaded by kubetune submit)",
                              namespace=connection.namespace)
        # The server stores the uploaded file as the pipeline's first version.
        versions = kfp_client.list_pipeline_versions(created.pipeline_id, sort_by="created_at desc", page_size=1)
        version = versions.pipeline_versions[0]
        return created.pipeline_id, version.pipeline_version_id, version.display_name or pipeline.PIPELINE_NAME, True
    pipeline_id = found.pipelines[0].pipeline_id
    existing = kfp_client.list_pipeline_versions(pipeline_id, filter=name_filter(version_name))
    if existing.pipeline_versions:
        return pipeline_id, existing.pipeline_versions[0].pipeline_version_id, version_name, False
    version = _kfp_output(kfp_client.upload_pipeline_version, str(package), pipeline_version_name=version_name,
                          pipeline_id=pipeline_id, description=f"kubetune {__version__}")
    return pipeline_id, version.pipeline_version_id, version_name, True


def _prepare(connection: Connection, experiment: str):
    """Compile, connect, upload (or reuse) the pipeline version and find or create the experiment."""
    with tempfile.TemporaryDirectory(prefix="kubetune-submit-") as tmp:
        package, version_name = _compiled(Path(tmp))
        kfp_client = client(connection)
        with api_errors(connection, "upload the pipeline"):
            pipeline_id, version_id, version_name, uploaded = _pipeline_version(kfp_client, connection, package,
                                                                               version_name)
    with api_errors(connection, f"find or create the experiment {experiment!r}"):
        experiment_id = _kfp_output(kfp_client.create_experiment, experiment,
                                    namespace=connection.namespace).experiment_id
    return kfp_client, experiment_id, pipeline_id, version_id, version_name, uploaded


def submit(connection: Connection, cfg: RunConfig, accelerators: Accelerators = Accelerators(),
           experiment: Optional[str] = None, name: Optional[str] = None, prefix: str = "",
           service_account: Optional[str] = None, when_data_changes: bool = False) -> Submitted:
    """One run of the pipeline on the cluster. `retrain` is this with prefix 'retrain-'."""
    check_for_cluster(cfg)
    parameters = run_parameters(cfg, accelerators, when_data_changes)
    name = name or run_name(cfg, prefix)
    kfp_client, experiment_id, pipeline_id, version_id, version_name, uploaded = _prepare(
        connection, experiment or cfg.tracking.experiment)
    with api_errors(connection, "create the run"):
        # enable_caching=None keeps each task's own caching setting from the compiled pipeline.
        run = _kfp_output(kfp_client.run_pipeline, experiment_id=experiment_id, job_name=name, params=parameters,
                          pipeline_id=pipeline_id, version_id=version_id, enable_caching=None,
                          service_account=service_account)
    return Submitted(url=f"{connection.ui}/#/runs/details/{run.run_id}", experiment_id=experiment_id,
                     pipeline_id=pipeline_id, version_id=version_id, version_name=version_name, uploaded=uploaded,
                     run_id=run.run_id, run_name=name)


def _recurring_runs_named(kfp_client, connection: Connection, name: str) -> list:
    """Every recurring run with this display name the caller can see (all pages), whatever experiment."""
    found, token = [], ""
    while True:
        page = kfp_client.list_recurring_runs(page_token=token, page_size=PAGE_SIZE, namespace=connection.namespace)
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token
        if not token:
            return found


def schedule(connection: Connection, cfg: RunConfig, name: str, cron: str,
             accelerators: Accelerators = Accelerators(), experiment: Optional[str] = None,
             max_concurrency: int = 1, service_account: Optional[str] = None,
             when_data_changes: bool = False) -> Submitted:
    """A recurring run named `name`; one that exists under the name is replaced (create, then delete)."""
    check_for_cluster(cfg)
    cron = check_cron(cron)
    if not name.strip():
        raise ConfigError("--name", name, "name the recurring run, e.g. --name nightly-quotes")
    if max_concurrency < 1:
        raise ConfigError("--max-concurrency", max_concurrency, "allow at least 1 run at a time")
    parameters = run_parameters(cfg, accelerators, when_data_changes)
    kfp_client, experiment_id, pipeline_id, version_id, version_name, uploaded = _prepare(
        connection, experiment or cfg.tracking.experiment)
    with api_errors(connection, f"list the recurring runs named {name!r}"):
        previous = _recurring_runs_named(kfp_client, connection, name)
    with api_errors(connection, f"create the recurring run {name!r}"):
        recurring = kfp_client.create_recurring_run(
            experiment_id=experiment_id, job_name=name, cron_expression=kfp_cron(cron), params=parameters,
            pipeline_id=pipeline_id, version_id=version_id, max_concurrency=max_concurrency, no_catchup=True,
            enabled=True, enable_caching=None, service_account=service_account,
            description=f"kubetune schedule {cron!r}; `kubetune schedule --name {name}` replaces it")
    with api_errors(connection, f"delete the replaced recurring run(s) named {name!r}"):
        for old in previous:
            kfp_client.delete_recurring_run(old.recurring_run_id)
    return Submitted(url=f"{connection.ui}/#/recurringrun/details/{recurring.recurring_run_id}",
                     experiment_id=experiment_id, pipeline_id=pipeline_id, version_id=version_id,
                     version_name=version_name, uploaded=uploaded, recurring_run_id=recurring.recurring_run_id,
                     replaced=[old.recurring_run_id for old in previous])

