"""What keeps `kubetune run` from paying twice: the run's own preflight handed to the preflight task,
tokenized artifacts reused by content, stage timers that start with the stage's process."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from kubetune import artifacts, console
from kubetune.config import RunConfig
from kubetune.overrides import with_value
from kubetune.errors import ConfigError
from kubetune.preflight import PASSED_ENV, PreflightReport, passed_earlier, passed_record
from kubetune.build_cache import reuse_or_build
from kubetune.storage import LocalStore
from kubetune.tokenization import cache_key


def test_stage_timer_starts_with_a_kfp_tasks_process(monkeypatch):
    monkeypatch.delenv("_KFP_RUNTIME", raising=False)
    assert abs(console.stage_started() - time.monotonic()) < 0.5  # a stage function called in a test
    monkeypatch.setenv("_KFP_RUNTIME", "true")
    # This pytest process started well before now; a KFP task's process exists for its stage.
    assert time.monotonic() - console.stage_started() > 1.0


def report() -> PreflightReport:
    return PreflightReport(tracking_uri="sqlite:///x.db", data={"rows": 10, "sha256": "abc", "info": {}},
                           model={"path": "/m", "architecture": "LlamaForCausalLM", "blocks": 2}, storage_uri="/s")


def test_preflight_task_takes_the_runs_own_report_for_exactly_that_config(monkeypatch):
    cfg = RunConfig().validate()  # as every stage builds it: defaults resolved
    monkeypatch.setenv(PASSED_ENV, passed_record(cfg, report()))
    # The stage receives the config as JSON and rebuilds it: the same config.
    assert passed_earlier(RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))), None) == report()
    assert passed_earlier(with_value(cfg, "train.max_steps", 41), None) is None
    monkeypatch.setenv(PASSED_ENV, "{not json")
    assert passed_earlier(cfg, None) is None
    monkeypatch.delenv(PASSED_ENV)
    assert passed_earlier(cfg, None) is None


def test_precision_is_still_checked_against_the_gpus_the_task_is_granted(monkeypatch):
    cfg = with_value(RunConfig(), "train.precision", "bf16")
    monkeypatch.setenv(PASSED_ENV, passed_record(cfg, report()))
    with pytest.raises(ConfigError, match="train.precision"):
        passed_earlier(cfg, train_gpus=False)


def write_rows(folder: Path, rows: list[dict]) -> Path:
    artifacts.write_dataset(folder, {"train": rows, "validation": rows[:1]}, {"rows_source": len(rows)})
    return folder


def test_tokenize_key_follows_content_and_settings_not_places(tmp_path):
    rows = [{"text": f"row {i}"} for i in range(5)]
    cfg = RunConfig().data
    first = cache_key(write_rows(tmp_path / "a", rows), "tok1", cfg, "causal_lm")
    assert cache_key(write_rows(tmp_path / "b", rows), "tok1", with_value(RunConfig(), "data.path",
                                                                          "/elsewhere/q.json").data,
                     "causal_lm") == first  # the same rows read from another place
    assert cache_key(write_rows(tmp_path / "c", rows[:4]), "tok1", cfg, "causal_lm") != first
    assert cache_key(tmp_path / "a", "tok2", cfg, "causal_lm") != first
    assert cache_key(tmp_path / "a", "tok1", with_value(RunConfig(), "data.max_length", 32).data, "causal_lm") != first
    assert cache_key(tmp_path / "a", "tok1", cfg, "classification") != first


def test_reuse_or_build_builds_once_and_never_reuses_a_copy_cut_short(tmp_path):
    store = LocalStore(tmp_path / "store")
    built = []

    def build(folder: Path) -> None:
        built.append(folder)
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "file.txt").write_text("made")

    assert reuse_or_build(store, "thing", "k1", tmp_path / "out1", build) is False
    assert reuse_or_build(store, "thing", "k1", tmp_path / "out2", build) is True
    assert len(built) == 1 and (tmp_path / "out2" / "sub" / "file.txt").read_text() == "made"
    assert not (tmp_path / "out2" / "k1.complete").exists()  # the marker is beside the copy, not in it
    (store.root / "cache" / "thing" / "k1.complete").unlink()  # as if the copy had been cut short
    assert reuse_or_build(store, "thing", "k1", tmp_path / "out3", build) is False
    assert len(built) == 2


def test_a_quiet_run_shows_stage_lines_warnings_and_bars_only_on_a_terminal():
    import io

    from kubetune.console import StageLines, summary

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for out, bars in ((io.StringIO(), False), (Terminal(), True)):
        lines = StageLines(out=out)
        lines.started("train")
        lines.line("train", '[KFP Executor 2026-12-02 INFO]: Got executor_input:\n')
        lines.line("train", '{"inputs": {"parameterValues": {"config_json": "..."}}}\n')
        lines.line("train", "{'loss': '4.283', 'grad_norm': '0.1872'}\n")
        lines.line("train", "\r 50%|#####     | 6/12 [00:01<00:01, 5.1it/s]\r 58%|######    | 7/12 [00:01<00:01, 5.2it/s]\n")
        lines.line("train", "Saving the dataset (1/1 shards): 100%|##########| 64/64 [00:00, 17865.92 examples/s]\n")
        lines.line("train", "2026-12-02 06:21:56,891 WARNING kubetune.training: checkpoint-6 could not be stored\n")
        lines.line("train", "[KFP Executor 2026-12-02 06:21:56,891 INFO]: stage result: 12 steps, loss 4.283 -> 4.090\n")
        lines.finished("train", 1.94, True)
        shown = out.getvalue()
        assert shown.startswith("> train\n") and "executor_input" not in shown and "'loss'" not in shown
        assert "WARNING kubetune.training: checkpoint-6 could not be stored" in shown
        assert shown.endswith("= train            1.9 s  12 steps, loss 4.283 -> 4.090\n")
        assert ("7/12" in shown) is bars and "6/12" not in shown and "examples/s" not in shown
    # the stages' side: what console.summary logs, in kfp's executor format, is the line read above
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("kubetune.summary")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO  # stages run with INFO (console.setup)
    try:
        summary("108 train, 12 validation rows")
    finally:
        logger.removeHandler(handler)
        logger.level = level
    out = io.StringIO()
    lines = StageLines(out=out)
    lines.line("prepare_data", f"[KFP Executor 2026-12-02 06:21:56,891 INFO]: {records[0].getMessage()}\n")
    lines.finished("prepare_data", 0.3, True)
    assert out.getvalue() == "= prepare_data     0.3 s  108 train, 12 validation rows\n"
