"""Model preparation on tiny real models: what is frozen, what trains, and how it is counted."""

import json
import logging

import pytest
import torch

from kubetune import modeling
from kubetune.config import LoraSettings, ModelConfig
from kubetune.errors import ModelError


def tiny(kind: str):
    import transformers as t

    configs = {
        "llama": t.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2),
        "opt": t.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                           word_embed_proj_dim=32),
        "gpt2": t.GPT2Config(vocab_size=64, n_embd=32, n_layer=3, n_head=4),
        "bert": t.BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=4),
    }
    torch.manual_seed(0)
    if kind == "bert":
        return t.BertModel(configs[kind])
    return t.AutoModelForCausalLM.from_config(configs[kind])


@pytest.mark.parametrize("kind, path, expected", [
    ("llama", "model.layers", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    ("opt", "model.decoder.layers", {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}),
    ("gpt2", "transformer.h", {"c_attn", "c_proj", "c_fc"}),
    ("bert", "encoder.layer", {"query", "key", "value", "dense"}),
])
def test_blocks_and_linear_modules_found_without_a_table(kind, path, expected):
    model = tiny(kind)
    found_path, blocks = modeling.find_blocks(model)
    assert found_path == path and len(blocks) == 3
    assert expected <= set(modeling.linear_module_names(model))


def test_unknown_target_modules_list_the_valid_ones():
    with pytest.raises(ModelError) as raised:
        modeling.check_target_modules(tiny("gpt2"), ["q_proj", "c_attn"])
    message = str(raised.value)
    assert message.startswith("model.lora.target_modules = ['q_proj', 'c_attn']: q_proj not in this model")
    assert "c_attn, c_fc, c_proj" in message


def test_already_quantized_model_refuses_8bit(tmp_path):
    model = tiny("llama")
    model.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    model.config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"model.quantization = '8bit': .* already quantized with gptq"):
        modeling.check_quantizable(tmp_path, model, "8bit")
    modeling.check_quantizable(tmp_path, model, "none")  # fine as it is


def test_freeze_beyond_the_model_is_refused():
    cfg = ModelConfig(quantization="none", freeze_layers=3, lora=LoraSettings())
    with pytest.raises(ModelError, match="model.freeze_layers = 3: the model has 3 blocks"):
        modeling.check_freeze(tiny("llama"), cfg)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny("llama").save_pretrained(path)
    return path


def test_8bit_lora_recipe(llama_dir, tmp_path, caplog):
    cfg = ModelConfig(name_or_path=str(llama_dir), quantization="8bit",
                      lora=LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with caplog.at_level(logging.INFO, logger="kubetune.modeling"):
        plan = modeling.prepare_model(llama_dir, cfg, tmp_path / "prepared", seed=0)
    model = modeling.load_for_training(llama_dir, tmp_path / "prepared", cfg)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 3 * 2 * 2  # 3 blocks x (q, v) x (A, B)
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear8bitLt"]
    assert quantized, "the base was not loaded in 8-bit"
    norms = [p for n, p in model.named_parameters() if p.ndim == 1 and "norm" in n]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    assert model.base_model.model.is_activation_checkpointing

    # The logged line is PEFT's own count, exactly.
    expected = modeling.trainable_line(*model.get_nb_trainable_parameters())
    assert f"prepare_model: {expected}" in caplog.messages and plan["trainable_line"] == expected
    # per block: q_proj 32->32 gives A 4x32 + B 32x4; v_proj 32->16 (2 kv heads) gives A 4x32 + B 16x4
    assert plan["trainable_params"] == 3 * ((4 * 32 + 32 * 4) + (4 * 32 + 16 * 4))
    ids = torch.randint(0, 64, (2, 8))
    output = model(input_ids=ids, labels=ids)
    assert output.logits.dtype == torch.float32
    output.loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_A" in n)


def test_initial_adapter_is_reused_exactly(llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(llama_dir), quantization="none", lora=LoraSettings(r=4, alpha=8))
    modeling.prepare_model(llama_dir, cfg, tmp_path / "prepared", seed=0)
    one = modeling.load_for_training(llama_dir, tmp_path / "prepared", cfg)
    two = modeling.load_for_training(llama_dir, tmp_path / "prepared", cfg)
    for (name, a), (_, b) in zip(one.named_parameters(), two.named_parameters()):
        if "lora_A" in name:
            assert torch.equal(a, b)


def test_freezing_without_lora_trains_only_upper_blocks(llama_dir):
    cfg = ModelConfig(quantization="none", freeze_layers=2, lora=None, gradient_checkpointing=False)
    model = modeling.prepare_for_training(modeling.load_base_model(llama_dir, "none"), cfg, "none")
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("model.embed_tokens") for n in frozen)
    assert all(not p.requires_grad for n, p in model.named_parameters() if n.startswith(("model.layers.0.", "model.layers.1.")))
    assert all(p.requires_grad for n, p in model.named_parameters() if n.startswith("model.layers.2."))


def test_lora_with_frozen_blocks_adapts_only_the_rest(llama_dir):
    cfg = ModelConfig(quantization="none", freeze_layers=2, lora=LoraSettings(r=2, alpha=4))
    model = modeling.prepare_for_training(modeling.load_base_model(llama_dir, "none"), cfg, "none")
    adapted = {n.split(".layers.")[1].split(".")[0] for n, _ in model.named_parameters() if "lora_" in n}
    assert adapted == {"2"}


def test_4bit_loads_and_trains_after_a_no_grad_forward(llama_dir, tmp_path):
    cfg = ModelConfig(name_or_path=str(llama_dir), quantization="4bit", lora=LoraSettings(r=4, alpha=8))
    modeling.prepare_model(llama_dir, cfg, tmp_path / "prepared", seed=0)
    model = modeling.load_for_training(llama_dir, tmp_path / "prepared", cfg)
    assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    plan = json.loads((tmp_path / "prepared" / "plan.json").read_text())
    assert plan["quantization"] == "4bit" and plan["trainable_params"] > 0


@pytest.mark.parametrize("kind, limit, key, absolute", [
    ("gpt2", 1024, "n_positions", True),  # learned wpe
    ("opt", 2048, "max_position_embeddings", True),  # learned, offset by 2 rows
    ("bert", 512, "max_position_embeddings", True),
    ("llama", 2048, "max_position_embeddings", False),  # rotary
])
def test_positions_are_read_from_the_config_and_the_embeddings(kind, limit, key, absolute):
    found = modeling.positions(tiny(kind))
    assert (found.limit, found.key, found.absolute) == (limit, key, absolute)
    assert f"has {limit} " in found.describe() and key in found.describe()


def test_roberta_positions_start_after_the_padding_index():
    import transformers as t

    config = t.RobertaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=4, max_position_embeddings=514, pad_token_id=1)
    with torch.device("meta"):
        model = t.RobertaForSequenceClassification(config)
    assert modeling.positions(model).limit == 512


def _model_folder(path, config: dict, files: dict = {}):
    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (path / name).write_text(text)
    return path


def test_custom_code_with_an_unknown_model_type_is_refused_without_running_it(tmp_path):
    ran = tmp_path / "ran"
    code = f"open({str(ran)!r}, 'w').write('x')\n"
    folder = _model_folder(tmp_path / "custom", {"model_type": "mytiny", "auto_map": {
        "AutoConfig": "configuration_mytiny.MyTinyConfig", "AutoModelForCausalLM": "modeling_mytiny.MyTiny"}},
        {"modeling_mytiny.py": code, "configuration_mytiny.py": code})
    with pytest.raises(ModelError, match=r"^model.name_or_path = 'my/custom': model_type 'mytiny' needs the model's "
                                         r"own code \(configuration_mytiny.py, modeling_mytiny.py: trust_remote_code\), "
                                         r"which kubetune does not run; use a model whose model_type transformers"):
        modeling.check_model_type("my/custom", folder)
    only_map = _model_folder(tmp_path / "map", {"model_type": "mytiny", "auto_map": {"AutoConfig": "x.Y"}})
    with pytest.raises(ModelError, match=r"\(auto_map in config.json: trust_remote_code\)"):
        modeling.check_model_type("m", only_map)
    assert not ran.exists()


def test_unknown_model_type_without_code_and_known_types(tmp_path):
    with pytest.raises(ModelError, match=r"^model.name_or_path = 'm': transformers \S+ does not know model_type 'nosuch'"):
        modeling.check_model_type("m", _model_folder(tmp_path / "unknown", {"model_type": "nosuch"}))
    # A known type passes, even where the folder also ships code (transformers then uses its own).
    modeling.check_model_type("m", _model_folder(tmp_path / "llama", {"model_type": "llama", "auto_map": {}},
                                                 {"modeling_llama.py": "raise SystemExit\n"}))


def test_a_gpu_stage_in_a_pod_that_sees_fewer_gpus_than_granted_stops_at_once(monkeypatch):
    """This machine has no GPU: a pod granted one must say so rather than train on its CPUs."""
    import pytest

    from kubetune import stages
    from kubetune.errors import ConfigError

    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # what every pod has
    with pytest.raises(ConfigError, match=r"^accelerator_count = 1: this pod sees 0 of the 1 nvidia.com/gpu the "
                                          r"pipeline granted it"):
        stages._check_granted(1, "nvidia.com/gpu")
    stages._check_granted(0, "nvidia.com/gpu")  # granted none: nothing to check
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    stages._check_granted(1, "nvidia.com/gpu")  # `kubetune run`: kfp.local grants nothing, whatever the parameter
