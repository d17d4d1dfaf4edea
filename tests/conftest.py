"""Fixtures for the whole suite: an isolated environment, a real S3 API (moto) and a real MLflow server.

Both servers are real HTTP processes on loopback, started once per session and only when a test
asks for them: `s3_server` (+ `s3_bucket` per test) and `mlflow_server`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


_LOCAL = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via HTTP(S)_PROXY


def _wait_for(url: str, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with _LOCAL.open(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers, which is all we wait for
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    _stop(process)
    raise RuntimeError(f"{process.args} did not answer {url} in {timeout} s:\n{log_path.read_text()[-3000:]}")


def _start(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=log_path.parent, env=env, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the process group (servers spawn workers), SIGKILL what is left after 10 s."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


@pytest.fixture
def free_port() -> int:
    """A loopback TCP port that nothing listens on (right now)."""
    return _free_port()


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """No test sees the developer's state, MLflow, AWS account, hub, or the shared /tmp."""
    tmp = tmp_path_factory.mktemp("tmp")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KUBETUNE_HOME", str(tmp_path_factory.mktemp("kubetune_home")))
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setenv("TOKENIZERS_PARALLELISM", "false")
        # kfp.local leaves a temp file per task behind: keep them inside pytest's basetemp.
        mp.setenv("TMPDIR", str(tmp))
        mp.setattr(tempfile, "tempdir", str(tmp))  # gettempdir() caches; pytest already called it
        # Fake AWS credentials, so nothing can reach a real account; endpoints come from fixtures.
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                     "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_CONFIG_FILE", str(tmp / "no-aws-config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp / "no-aws-credentials"))
        yield


@dataclass
class S3Server:
    endpoint_url: str

    def client(self):
        """A plain boto3 S3 client for this server (fake credentials from the environment)."""
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 API as a separate HTTP server on loopback; in memory, gone at the end of the session."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    process = _start([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], log_path,
                     dict(os.environ))
    endpoint_url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{endpoint_url}/moto-api/", process, log_path, timeout=30)
        yield S3Server(endpoint_url)
    finally:
        _stop(process)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A fresh, empty bucket on the moto server; yields its name."""
    name = f"kubetune-test-{uuid.uuid4().hex[:12]}"
    s3_server.client().create_bucket(Bucket=name)
    yield name


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real `mlflow server` (sqlite store, proxied artifacts); yields its http:// tracking URI.

    Artifacts go through the server (mlflow-artifacts:/), so a client in any process, like a KFP
    task, can log artifacts and register models with nothing but the URI.
    """
    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts", "--artifacts-destination", (root / "artifacts").as_uri(),
    ]
    log_path = root / "server.log"
    process = _start(command, log_path, {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    uri = f"http://127.0.0.1:{port}"
    try:
        _wait_for(f"{uri}/health", process, log_path, timeout=90)
        yield uri
    finally:
        _stop(process)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-block Llama-architecture causal LM with its own trained tokenizer, briefly pretrained on
    general text, saved like a hub snapshot (see tests/tiny.py)."""
    from tiny import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny_llama") / "model")


@pytest.fixture(scope="session")
def quotes_file(tmp_path_factory) -> Path:
    """80 quote records in the shape of the shared quotes file."""
    from tiny import write_quotes

    return write_quotes(tmp_path_factory.mktemp("data") / "quotes.json", count=80)


# ---- shared by a unit test file and its integration or e2e half (scoped as where they came from) ---


@pytest.fixture
def kubetune_home(tmp_path, monkeypatch) -> Path:
    """A fresh, empty model cache for this test."""
    home = tmp_path / "home"
    monkeypatch.setenv("KUBETUNE_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    """A 2-block BERT encoder without a task head, like all-MiniLM-L6-v2 (see tests/tiny.py)."""
    from tiny import build_tiny_bert

    return build_tiny_bert(tmp_path_factory.mktemp("tiny_bert") / "model")


@pytest.fixture(scope="module")
def bert_mlm_dir(bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT saved with a masked-LM pretraining head (as bert-base-uncased ships one)."""
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny_bert_mlm") / "model"
    torch.manual_seed(1)
    BertForMaskedLM.from_pretrained(bert_dir).save_pretrained(path)
    AutoTokenizer.from_pretrained(bert_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def general_reviews(tmp_path_factory) -> Path:
    """General text in the tiny tokenizer's vocabulary, lines of 8 words or more."""
    from tiny import sentiment_rows

    rows = sentiment_rows(120, seed=7)
    path = tmp_path_factory.mktemp("general_reviews") / "general.txt"
    path.write_text("\n".join(f"{a['review']} and {b['review']}" for a, b in zip(rows[::2], rows[1::2])) + "\n")
    return path


@pytest.fixture(scope="module")
def general_file(tmp_path_factory):
    """General English lines of 8 words or more under a heading line, for replay and retention."""
    from tiny import general_texts

    path = tmp_path_factory.mktemp("general") / "general.txt"
    lines = [line for line in general_texts() if len(line.split()) >= 8][:300]
    path.write_text("= A heading that is skipped =\n\n" + "\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from a second thread, and on a busy machine OpenMP's waiting makes
    them many times slower (measured: 0.16 s vs 14.7 s for the same tiny evaluation). A module asks
    for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cpu_image(tmp_path_factory) -> str:
    """kubetune's CPU image of this checkout, built (or reused, layer by layer) by the script behind
    `make images-local`, which installs podman first where it can. Skips where containers cannot
    run here, with the script's one-line reason."""
    from kubetune.images import CPU_IMAGE

    logs = tmp_path_factory.mktemp("image_logs")
    script = Path(__file__).resolve().parents[1] / "docker" / "build_local.py"
    done = subprocess.run([sys.executable, str(script), "--flavor", "cpu", "--log-dir", str(logs)],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode == 2:  # containers cannot run here: the script says why on one line
        pytest.skip(done.stderr.strip())
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return CPU_IMAGE


@pytest.fixture
def webhook():
    """A real HTTP receiver on loopback standing in for a Slack/Teams incoming webhook (tiny.WebhookReceiver)."""
    from tiny import WebhookReceiver

    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


# ---- the cluster commands' tests: the KFP API stand-in (tests/kfp_stand_in.py) and a config a pod can run ----


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """A started KfpApiStandIn on a free loopback port; kfp.Client sees no developer context or env."""
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH",
                 "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                 "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("kfp.client.client.Client._LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr("kubetune.launch.cluster.TOKEN_FILE", str(tmp_path / "no-service-account-token"))
    from kfp_stand_in import KfpApiStandIn

    with KfpApiStandIn().serving() as stand_in:
        yield stand_in


@pytest.fixture
def cluster_config(tmp_path):
    """A config a pod can run: every location remote."""
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": "facebook/opt-125m"},
        "data": {"path": "s3://kubetune-data/quotes.jsonl"},
        "evaluate": {"retention_path": None},
        "register": {"model_name": "quotes-lora"},
        "tracking": {"experiment": "quotes-cluster"},
        "storage": {"uri": "s3://kubetune-artifacts/runs"},
    }))
    return path
