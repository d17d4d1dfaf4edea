from pathlib import Path

import pytest

from kubetune.config import RunConfig, default_config
from kubetune.run_config import load_config
from kubetune.overrides import apply_overrides
from kubetune.config_reference import describe
from kubetune.errors import ConfigError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_defaults_are_the_valid_demo_recipe():
    cfg = RunConfig.from_dict(default_config())
    assert cfg.task == "causal_lm"
    assert cfg.model.quantization == "8bit"
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (16, 32, 0.05)
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]


def test_overrides_parse_yaml_values():
    data = apply_overrides(default_config(), ["train.max_steps=7", "model.lora=null", "data.max_rows=20",
                                              "model.quantization=none"])
    cfg = RunConfig.from_dict(data)
    assert cfg.train.max_steps == 7 and cfg.model.lora is None and cfg.data.max_rows == 20


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  quantization: none\n  lora: {r: 4}\ntrain: {max_steps: 3}\n")
    cfg = load_config(path, ["train.max_steps=5"])
    assert cfg.model.quantization == "none"
    assert cfg.model.lora.r == 4 and cfg.model.lora.alpha == 32  # unspecified keys keep their defaults
    assert cfg.train.max_steps == 5


@pytest.mark.parametrize("overrides, field, shown", [
    (["model.lora.r=0"], "model.lora.r", "0"),
    (["train.max_steps=-1"], "train.max_steps", "-1"),
    (["train.max_steps=ten"], "train.max_steps", "'ten'"),
    (["model.quantization=3bit"], "model.quantization", "'3bit'"),
    (["train.learning_rate=2"], "train.learning_rate", "2.0"),
    (["data.validation_fraction=0"], "data.validation_fraction", "0.0"),
    (["model.lora=null"], "model.quantization", "'8bit'"),
    (["train.bogus=1"], "train.bogus", "1"),
    (["task=translation"], "task", "'translation'"),
    # the task kinds' own rules (TaskKind.check_config), applied by kubetune.run_config
    (["task=classification"], "data.label_field", "None"),
    (["task=instruction"], "data.label_field", "None"),
    (["task=multitask"], "data.label_field", "None"),
    (["task=classification", "data.label_field=label", "data.replay_path=wiki.txt", "data.replay_fraction=0.1"],
     "data.replay_fraction", "0.1"),
])
def test_bad_values_name_the_field_and_value(overrides, field, shown):
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    message = str(raised.value)
    assert message.startswith(f"{field} = {shown}:"), message


def test_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"train.max_step = 10: unknown key; did you mean train.max_steps\? valid keys here are .*max_steps"):
        load_config(path)


def test_missing_config_file_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="--config"):
        load_config(tmp_path / "nope.yaml")


def test_every_key_has_help():
    rows = describe()
    assert {"model.lora.r", "train.max_steps", "tracking.mlflow_uri", "storage.uri"} <= {r[0] for r in rows}
    assert all(help_text for _, help_text, _ in rows)


def test_examples_are_valid_configs():
    assert EXAMPLES, "examples/ holds no configs"
    for path in EXAMPLES:
        load_config(path)


def test_numbers_in_e_notation_are_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 1e-4 as a string: it has no dot."""
    assert load_config(overrides=["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    (tmp_path / "run.yaml").write_text("train:\n  learning_rate: 3E-4\n  max_steps: 5\n")
    assert load_config(tmp_path / "run.yaml").train.learning_rate == 3e-4
    with pytest.raises(ConfigError, match=r"train.learning_rate = -0.0001: must be in \(0, 1\)"):
        load_config(overrides=["train.learning_rate=-1e-4"])
    for text in ("nan", "inf", "1e-4x"):
        with pytest.raises(ConfigError, match="expected number"):
            load_config(overrides=[f"train.learning_rate={text}"])
    with pytest.raises(ConfigError, match="expected integer"):
        load_config(overrides=["train.max_steps=1e3"])


def test_default_paths_do_not_depend_on_the_current_directory(tmp_path, monkeypatch):
    from kubetune.launch.local import anchor_defaults, pin_locations
    from kubetune.paths import checkout_root

    monkeypatch.chdir(tmp_path)
    cfg = pin_locations(RunConfig())
    shared = (checkout_root() / "../shared/data").resolve()
    if not shared.is_dir():
        pytest.skip("../shared/data is not beside the checkout")
    assert cfg.data.path == str(shared / "quotes" / "quotable_sample_quotes.json")
    assert cfg.evaluate.retention_path == str(shared / "retention" / "wikitext2_test.txt")
    # a path the user gives stays relative to where they run kubetune
    mine = RunConfig.from_dict({"data": {"path": "mine.jsonl"}})
    (tmp_path / "mine.jsonl").write_text("{}\n")
    assert pin_locations(mine).data.path == str(tmp_path / "mine.jsonl")
    # without a checkout (an installed wheel), the default retention text is skipped, not a failure
    monkeypatch.setattr("kubetune.launch.local.checkout_root", lambda: None)
    assert anchor_defaults(mine).evaluate.retention_path is None


def test_a_run_is_sized_by_steps_or_by_epochs():
    by_epochs = load_config(None, ["train.max_steps=null", "train.epochs=2.5", "train.batch_size=4",
                                   "train.gradient_accumulation_steps=2"]).train
    assert by_epochs.total_steps(100) == 33  # ceil(2.5 x ceil(100 / 8))
    assert load_config(None, ["train.max_steps=7"]).train.total_steps(100) == 7
    with pytest.raises(ConfigError, match=r"^train.epochs = 2.0: a run is sized by steps or by epochs, not both"):
        load_config(None, ["train.epochs=2"])
    with pytest.raises(ConfigError, match=r"^train.max_steps = None: size the run"):
        load_config(None, ["train.max_steps=null"])


@pytest.mark.parametrize("override, message", [
    ("train.lr_scheduler=step", "train.lr_scheduler = 'step': use one of linear, cosine, constant_with_warmup"),
    ("train.weight_decay=-0.1", "train.weight_decay = -0.1: must be 0 or more"),
    ("train.max_grad_norm=-1", "train.max_grad_norm = -1.0: must be 0 (off) or more"),
    ("train.early_stopping={patience: 0}", "train.early_stopping.patience = 0: must be 1 or more"),
])
def test_schedule_settings_are_checked(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value).startswith(message)


def test_early_stopping_needs_evaluations_during_training():
    with pytest.raises(ConfigError, match=r"^train.early_stopping = 'set': early stopping watches the evaluations"):
        load_config(None, ["train.eval_steps=0", "train.early_stopping={patience: 2}"])
    assert load_config(None, ["train.early_stopping={patience: 2}"]).train.early_stopping.min_delta == 0.0


def test_a_mistyped_key_gets_the_closest_valid_one():
    with pytest.raises(ConfigError, match=r"^train.learning_rat = '1e-3': unknown key; did you mean train.learning_rate\? "):
        load_config(None, ["train.learning_rat=1e-3"])
    with pytest.raises(ConfigError, match=r"^trian = \{'max_steps': 3\}: unknown key; did you mean train\? "):
        load_config(None, ["trian.max_steps=3"])
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["train.zzz=1"])
    assert "did you mean" not in str(caught.value)
    assert load_config(None, ["train.learning_rate=1e-3"]).train.learning_rate == 0.001


@pytest.mark.parametrize("seed", [-5, 2**32])
def test_seed_outside_what_numpy_takes_is_refused(seed):
    with pytest.raises(ConfigError, match=rf"^train.seed = {seed}: must be 0 to 4294967295 \(2\*\*32 - 1\), e.g. 42$"):
        load_config(None, [f"train.seed={seed}"])
    assert load_config(None, [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
    assert load_config(None, ["train.seed=0"]).train.seed == 0


def test_the_task_help_names_every_kind_and_a_chat_run_needs_no_label_field():
    import dataclasses

    from kubetune.tasks import KINDS

    help_text = next(f for f in dataclasses.fields(RunConfig) if f.name == "task").metadata["help"]
    assert all(name in help_text for name in KINDS), [name for name in KINDS if name not in help_text]
    assert load_config(None, ["task=chat"]).data.label_field is None


def test_section_rules_alone_leave_the_task_kinds_rules_to_run_config():
    """kubetune.config checks sections; the kind's rules come from kubetune.run_config (and preflight)."""
    from kubetune.config import read_config

    assert read_config(None, ["task=classification"]).task == "classification"
    with pytest.raises(ConfigError, match="^data.label_field = None: task classification needs the field"):
        load_config(None, ["task=classification"])


def test_a_run_is_named_after_what_it_set_unless_named():
    from kubetune.run_config import named

    overrides = ["train.learning_rate=3e-3", "model.lora.r=8"]
    assert named(load_config(None, overrides), None, overrides).tracking.run_name == "quotes-lora learning_rate=3e-3 r=8"
    assert named(load_config(None, overrides), "lr sweep 1", overrides).tracking.run_name == "lr sweep 1"
    assert named(load_config(None, []), None, []).tracking.run_name is None
    long = named(load_config(None, [f"data.instruction={'x' * 400}"]), None, [f"data.instruction={'x' * 400}"])
    assert len(long.tracking.run_name) == 250 and long.tracking.run_name.endswith("...")
    with pytest.raises(ConfigError, match=r"^tracking.run_name = ' ': give a name of 1 to 250 characters"):
        named(load_config(None, []), " ", [])


def test_params_are_what_the_config_set_without_nulls_and_resume_still_sees_a_changed_null():
    from kubetune import tracking

    params = tracking.flatten(load_config(None, []).to_dict())
    assert "null" not in params.values() and "data.test_path" not in params and params["model.lora.r"] == "16"


def test_a_run_name_made_from_set_values_never_shows_a_password():
    from kubetune.overrides import run_name

    name = run_name("m", {"data.path": "https://reader:hunter2@host/q.json", "train.max_steps": 5})
    assert name == "m path=https://reader:***@host/q.json max_steps=5"
