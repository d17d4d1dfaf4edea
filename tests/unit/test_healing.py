"""Failures that heal: a retried stage attempt against a real (sqlite) MLflow store, and checkpoint
storage that keeps the newest complete checkpoints and never resumes from a half-uploaded one."""

import json

import pytest

from kubetune import tracking
from kubetune.tracking import lifecycle
from kubetune.errors import ConfigError, ServiceError
from kubetune.storage import LocalStore
from kubetune.training import latest_checkpoint, store_checkpoint


@pytest.fixture
def logger(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id = tracking.start_run(uri, "heal", "heal", {"train": {"max_steps": 1}}, {})
    return tracking.RunLogger(uri, run_id)


def run_of(logger):
    return logger.client.get_run(logger.run_id)


def test_a_retried_stage_clears_the_failed_attempt_and_counts_every_attempt(logger):
    with pytest.raises(RuntimeError):
        with logger.stage("train"):
            raise RuntimeError("node lost")
    failed = run_of(logger)
    assert failed.info.status == "FAILED" and failed.data.tags["kubetune.failed_stage"] == "train"
    first = failed.data.metrics["timing/train_attempt_seconds"]
    with logger.stage("train"):
        pass
    healed = run_of(logger)
    assert healed.info.status == "RUNNING"
    assert "kubetune.failed_stage" not in healed.data.tags and "kubetune.error" not in healed.data.tags
    assert healed.data.metrics["timing/train_attempts"] == 2
    assert healed.data.metrics["timing/train_seconds"] >= first


def test_an_attempt_that_failed_on_bad_input_is_not_redone(logger):
    with pytest.raises(ConfigError):
        with logger.stage("train"):
            raise ConfigError("train.precision", "bf16", "this GPU has no bf16 support")
    ran = []
    with pytest.raises(ConfigError, match=r"train.precision = 'bf16': this GPU has no bf16 support \(an earlier "
                                          r"attempt of train failed on this; a retry cannot fix it\)"):
        with logger.stage("train"):
            ran.append(True)
    assert not ran


def test_a_service_outage_is_retried_like_any_failure(logger):
    with pytest.raises(ServiceError):
        with logger.stage("train"):
            raise ServiceError("storage.uri", "s3://b", "cannot reach the S3 endpoint")
    with logger.stage("train"):
        pass
    assert run_of(logger).data.metrics["timing/train_attempts"] == 2


def checkpoint(root, step):
    folder = root / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"w" * step)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def test_storage_keeps_the_newest_complete_checkpoints(tmp_path):
    store = LocalStore(tmp_path / "store")
    for step in (2, 4, 6):
        store_checkpoint(store, checkpoint(tmp_path / "work", step), "runs/r", keep=2)
    assert sorted({k.split("/")[3] for k in store.list("runs/r/checkpoints")}) == ["checkpoint-4", "checkpoint-6"]
    assert latest_checkpoint(store, "runs/r") == "runs/r/checkpoints/checkpoint-6"


def test_a_half_uploaded_checkpoint_is_not_resumed_from(tmp_path):
    store = LocalStore(tmp_path / "store")
    store_checkpoint(store, checkpoint(tmp_path / "work", 2), "runs/r", keep=2)
    # an upload cut off before its last file: trainer_state.json goes last, so step 4 is incomplete
    store.upload_file(checkpoint(tmp_path / "work", 4) / "adapter_model.safetensors",
                      "runs/r/checkpoints/checkpoint-4/adapter_model.safetensors")
    assert latest_checkpoint(store, "runs/r") == "runs/r/checkpoints/checkpoint-2"


def test_trainer_state_is_uploaded_last(tmp_path):
    order = []

    class Recording(LocalStore):
        def upload_file(self, path, key):
            order.append(key.rsplit("/", 1)[-1])
            super().upload_file(path, key)

    folder = checkpoint(tmp_path / "work", 2)
    (folder / "zz_scheduler.pt").write_bytes(b"s")
    store_checkpoint(Recording(tmp_path / "store"), folder, "runs/r", keep=2)
    assert order[-1] == "trainer_state.json" and len(order) == 3


def test_a_checkpoint_upload_that_fails_does_not_fail_training(tmp_path, caplog):
    """Storage down past storage.retry_seconds at one save: a warning, and the next save stores its
    checkpoint (the Trainer's callbacks, called as the Trainer calls them)."""
    from types import SimpleNamespace

    from kubetune.training import Runtime, TokenCounter, make_callbacks

    class Flaky(LocalStore):
        failures = 1

        def upload_file(self, path, key):
            if Flaky.failures:
                Flaky.failures -= 1
                raise ServiceError("storage.uri", "s3://b", "cannot reach the S3 endpoint")
            super().upload_file(path, key)

    store = Flaky(tmp_path / "store")
    *_, upload = make_callbacks(None, store, "runs/r", keep=2, runtime=Runtime(None), counter=TokenCounter())
    args = SimpleNamespace(output_dir=str(tmp_path / "work"), world_size=1, local_process_index=0)
    for step in (2, 4):
        checkpoint(tmp_path / "work", step)
        upload.on_save(args, SimpleNamespace(global_step=step, max_steps=4, is_world_process_zero=True), None)
    assert any("checkpoint-2 could not be stored" in r.getMessage() for r in caplog.records)
    assert latest_checkpoint(store, "runs/r") == "runs/r/checkpoints/checkpoint-4"
    assert json.loads(store.read_bytes("runs/r/checkpoints/checkpoint-4/kubetune_runtime.json"))["train_seconds"] >= 0


def test_resume_refuses_a_run_it_cannot_continue(logger):
    config = {"train": {"max_steps": 1}}
    uri = logger.uri
    with pytest.raises(ConfigError, match=r"--resume = 'nosuchrun': no such run"):
        lifecycle.check_resumable(uri, "heal", "nosuchrun", config)
    with pytest.raises(ConfigError, match=r"--resume = .*: the run belongs to experiment 'heal'"):
        lifecycle.check_resumable(uri, "other", logger.run_id, config)
    with pytest.raises(ConfigError, match=r"another config: train.max_steps was 1, now 2 \(1 keys differ\)"):
        lifecycle.check_resumable(uri, "heal", logger.run_id, {"train": {"max_steps": 2}})
    logger.tags({"kubetune.failed_stage": "train"})
    logger.finish("FAILED")
    assert lifecycle.reopen_run(uri, "heal", logger.run_id, config) == logger.run_id
    reopened = run_of(logger)
    assert reopened.info.status == "RUNNING" and reopened.data.tags["kubetune.resumed"] == "1"
    assert "kubetune.failed_stage" not in reopened.data.tags
    logger.finish()
    with pytest.raises(ConfigError, match="the run finished"):
        lifecycle.check_resumable(uri, "heal", logger.run_id, config)
