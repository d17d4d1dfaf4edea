"""Fixtures of the cluster-command tests: the KFP API stand-in and a config a pod can run."""

from __future__ import annotations

import pytest
import yaml
from kfp_stand_in import KfpApiStandIn  # tests/deploy is on sys.path: pytest puts a conftest's folder there


@pytest.fixture
def kfp_api(monkeypatch, tmp_path):
    """A started KfpApiStandIn on a free loopback port; kfp.Client sees no developer context or env."""
    for name in ("KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT", "KF_PIPELINES_TOKEN", "KF_PIPELINES_SA_TOKEN_PATH",
                 "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                 "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr("kfp.client.client.Client._LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    monkeypatch.setattr("kubetune.launch.cluster.TOKEN_FILE", str(tmp_path / "no-service-account-token"))
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
