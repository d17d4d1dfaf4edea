"""Issue 23: no secret on screen or in a record, every error line bounded, the config file read strictly.

Credentials in a URI are masked in messages, log records and the run's MLflow params and tags (a real
sqlite store); a value or a message that would run to megabytes is cut; a key given twice in the
config file, and aliases that expand to millions of values, are refused with one short line.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from kubetune import console, tracking
from kubetune.run_config import load_config
from kubetune.errors import ConfigError, StageFailed, UserError, redacted
from tiny import tiny_run_config

PASSWORD = "hunter2-s3cr3t"


@pytest.mark.parametrize("text, masked", [
    (f"http://alice:{PASSWORD}@mlflow:5000/x", "http://alice:***@mlflow:5000/x"),
    ("https://ghp_token123@github.com/o/r.git", "https://***@github.com/o/r.git"),
    ("s3://bucket/key@v2 and http://host:5000", "s3://bucket/key@v2 and http://host:5000"),  # no userinfo
    ("postgresql://u:p@ss@db/x?a=b@c", "postgresql://u:***@db/x?a=b@c"),  # a raw @ in the password
    (f"['http://a:{PASSWORD}@h', 'me@example.com']", "['http://a:***@h', 'me@example.com']"),
    ("see http://a:b@h, then https://c@d.", "see http://a:***@h, then https://***@d."),
    ("http://alice:***@h", "http://alice:***@h"),  # masking twice changes nothing
    ("/work/https:/reader:pw@host/x.json", "/work/https:/reader:***@host/x.json"),  # a URI pathlib took for a path
])
def test_redacted_masks_the_userinfo_of_every_uri(text, masked):
    assert redacted(text) == masked


def test_a_user_error_masks_credentials_in_its_value_and_its_fix():
    error = ConfigError("data.path", f"https://reader:{PASSWORD}@data/x.json",
                        f"could not read https://reader:{PASSWORD}@data/x.json")
    assert PASSWORD not in str(error) and str(error).count("reader:***@data") == 2
    assert error.value.endswith("x.json") and PASSWORD in error.value  # the exception keeps what it was given


def test_a_long_value_is_cut_and_its_length_shown():
    error = ConfigError("train.max_steps", "x" * 28_000_000, "expected integer")
    assert len(str(error)) < 450
    assert str(error).startswith("train.max_steps = 'xxx") and "… (28,000,002 characters): expected integer" in str(error)


def test_a_long_message_is_cut_at_1500_characters():
    error = UserError("field", 1, "word " * 10_000)
    assert len(str(error)) < 1600 and "… (50,011 characters) …" in str(error)
    assert str(error).startswith("field = 1: word word") and str(error).endswith("word word ")  # what to do, at its end


def test_a_uri_cut_before_its_at_is_still_masked():
    error = ConfigError("data.path", "y" * 100 + f"http://alice:{PASSWORD}@host/" + "z" * 5000, "no such file")
    assert PASSWORD[:3] not in str(error) and "alice:***" in str(error)


def test_a_stage_failure_masks_and_cuts_its_error_line():
    failed = StageFailed("train", "a subprocess", 1, f"RuntimeError: http://u:{PASSWORD}@h " + "z" * 50_000,
                         log="/logs/train.log")
    assert PASSWORD not in str(failed) and "u:***@h" in str(failed)
    assert len(str(failed)) < 1700 and str(failed).endswith("; its full log: /logs/train.log")
    user = StageFailed("train", "a subprocess", 1, f"kubetune.errors.DataError: data.path = 'http://u:{PASSWORD}@h'")
    assert user.exit_code == 2 and PASSWORD not in str(user)


def test_log_records_are_masked_for_every_handler():
    console.setup()
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    logger = logging.getLogger("kubetune.test_secrets")
    logger.addHandler(handler)
    try:
        logger.warning("reading %s", f"https://reader:{PASSWORD}@data/x.json")
        try:
            raise OSError(f"cannot reach http://u:{PASSWORD}@h")
        except OSError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    assert PASSWORD not in out.getvalue()
    assert "https://reader:***@data/x.json" in out.getvalue() and "http://u:***@h" in out.getvalue()


def test_mlflow_params_and_tags_are_stored_masked(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.check_reachable(uri)
    config = tiny_run_config(Path("model"), Path("data.json"),
                             data={"path": f"https://reader:{PASSWORD}@data.example/quotes.json",
                                   "sources": [f"s3+https://key:{PASSWORD}@minio/b/k"]})
    run_id = tracking.start_run(uri, "secrets", "run", config, {"kubetune.source": f"http://u:{PASSWORD}@git/r"})
    tracking.RunLogger(uri, run_id).tags({"kubetune.error": f"could not read http://u:{PASSWORD}@h/x"})
    run = tracking.client(uri).get_run(run_id)
    stored = [*run.data.params.values(), *run.data.tags.values()]
    assert not [value for value in stored if PASSWORD in value]
    assert run.data.params["data.path"] == "https://reader:***@data.example/quotes.json"
    assert run.data.tags["kubetune.source"] == "http://u:***@git/r"
    assert run.data.tags["kubetune.error"] == "could not read http://u:***@h/x"
    tracking.RunLogger(uri, run_id).finish()


# ---- credentials in the URIs of the config ------------------------------------------------------

@pytest.mark.parametrize("overrides, field, variables", [
    ([f"tracking.mlflow_uri=http://alice:{PASSWORD}@127.0.0.1:5000"], "tracking.mlflow_uri", "MLFLOW_TRACKING_PASSWORD"),
    (["tracking.mlflow_uri=https://token123@mlflow.example"], "tracking.mlflow_uri", "MLFLOW_TRACKING_USERNAME"),
    ([f"storage.endpoint_url=http://KEY:{PASSWORD}@minio:9000"], "storage.endpoint_url", "AWS_SECRET_ACCESS_KEY"),
])
def test_a_uri_with_credentials_is_refused_and_shown_masked(overrides, field, variables):
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert caught.value.field == field and variables in message and "give the URI without them" in message
    assert PASSWORD not in message and "token123" not in message and "***@" in message


def test_mlflow_tracking_uri_with_credentials_is_refused(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@mlflow:5000")
    with pytest.raises(ConfigError) as caught:
        load_config()
    assert caught.value.field == "MLFLOW_TRACKING_URI" and PASSWORD not in str(caught.value)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert load_config().tracking.mlflow_uri is None


def test_a_database_tracking_uri_keeps_its_login():
    cfg = load_config(None, ["tracking.mlflow_uri=postgresql://mlflow:pw@db/mlflow"])
    assert cfg.tracking.mlflow_uri == "postgresql://mlflow:pw@db/mlflow"


# ---- the config file read strictly --------------------------------------------------------------

def _refusal(tmp_path, text: str, overrides=None) -> ConfigError:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, overrides)
    return caught.value


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    error = _refusal(tmp_path, "model:\n  quantization: none\ntrain:\n  max_steps: 5\n  max_steps: 50\n")
    assert error.field == "train.max_steps" and "lines 4 and 5" in str(error) and "keep one" in str(error)


def test_a_section_given_twice_is_refused(tmp_path):
    error = _refusal(tmp_path, "train:\n  max_steps: 5\nmodel: {quantization: none}\ntrain:\n  seed: 1\n")
    assert error.field == "train" and "lines 1 and 4" in str(error)


def test_a_key_given_twice_in_a_list_item_is_named_by_its_path(tmp_path):
    error = _refusal(tmp_path, "data:\n  sources:\n    - {path: a.json, path: b.json}\n")
    assert error.field == "data.sources[0].path"


def test_a_key_given_twice_in_a_set_value_is_refused():
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train={max_steps: 1, max_steps: 2}"])
    assert caught.value.field == "train.max_steps" and "given twice" in str(caught.value)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train: &t {max_steps: 5, seed: 3}\nevaluate: {max_samples: 8}\n")
    assert load_config(path).train.max_steps == 5
    path.write_text("model:\n  lora: &lora {r: 4, alpha: 8}\n  quantization: none\n"
                    "train:\n  max_steps: 6\n  <<: {seed: 3, max_steps: 9}\n")
    cfg = load_config(path)
    assert (cfg.train.max_steps, cfg.train.seed, cfg.model.lora.r) == (6, 3, 4)


def _alias_bomb(levels: int, under: str) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\n{under}: {{max_steps: *a{levels - 1}}}\n"


def test_an_alias_bomb_is_refused_in_one_short_line(tmp_path):
    error = _refusal(tmp_path, _alias_bomb(7, "train"))
    assert error.field == "--config" and "expand to" in str(error) and len(str(error)) < 300


def test_a_large_value_under_the_limit_gives_a_short_line(tmp_path):
    inline = ("train:\n  max_steps:\n    - &a [x, x, x, x, x, x, x, x, x]\n    - &b [" + ", ".join(["*a"] * 9) + "]\n"
              "    - &c [" + ", ".join(["*b"] * 9) + "]\n    - &d [" + ", ".join(["*c"] * 9) + "]\n"
              "    - [" + ", ".join(["*d"] * 9) + "]\n")
    error = _refusal(tmp_path, inline)
    assert error.field == "train.max_steps" and len(str(error)) < 450 and "characters)" in str(error)


def test_nesting_too_deep_is_refused(tmp_path):
    error = _refusal(tmp_path, "train: {max_steps: " + "[" * 5000 + "]" * 5000 + "}\n")
    assert error.field == "--config" and "nested too deeply" in str(error)


def test_yaml_semantics_are_kept(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# a comment\ntrain: {learning_rate: 1e-4, max_steps: 0x10}\nmodel: {lora: null, quantization: 'none'}\n")
    cfg = load_config(path)
    assert (cfg.train.learning_rate, cfg.train.max_steps, cfg.model.lora) == (1e-4, 16, None)
    path.write_text("")
    assert load_config(path).train.max_steps == load_config().train.max_steps
