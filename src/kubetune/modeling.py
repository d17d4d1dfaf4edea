"""Model preparation: quantized loading, freezing, LoRA, and counting what trains.

The classic PEFT recipe (opt-6.7b): load the base in 8-bit with bitsandbytes, freeze every base
weight, keep 1-D parameters (layer norms) in fp32, enable gradient checkpointing, cast the output
logits to fp32, then add LoRA adapters to the attention projections.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Iterator, Optional

from kubetune_serving.loading import compute_dtype, quantization_config

from kubetune import artifacts
from kubetune.config import ModelConfig
from kubetune.console import quiet_bitsandbytes
from kubetune.errors import ConfigError, ModelError
from kubetune.tasks import TaskKind, get_task

log = logging.getLogger(__name__)
# Module classes LoRA can wrap and bitsandbytes can quantize, by class name so no import is needed.
LINEAR_CLASSES = {"Linear", "Conv1D", "Linear8bitLt", "Linear4bit"}


def device_kind() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_4bit_workaround(model) -> None:
    # On the CPU, a no-grad forward through Linear4bit with this flag set breaks later training in
    # place ("a view of a leaf Variable ..."); measured here with bitsandbytes 0.50.2.
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False


def device_description() -> str:
    """This machine's training devices as a tag says them: `cpu`, or `2 x NVIDIA H100 80GB HBM3`."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"


def check_granted_gpus(granted: int, resource: str = "GPU") -> None:
    """A pod the pipeline gave GPUs must see them: one that sees fewer (a node without the NVIDIA
    container runtime, a CPU image) would train on the CPU for days instead of failing now."""
    import torch

    seen = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if seen < granted:
        raise ConfigError("accelerator_count", granted, f"this pod sees {seen} of the {granted} {resource or 'GPU'} "
                          "the pipeline granted it: check the node's device plugin and container runtime, or run "
                          "with accelerator_count 0 to use CPUs")


def _kind(task) -> TaskKind:
    """A TaskKind, given one or its name (None: causal_lm)."""
    return task if isinstance(task, TaskKind) else get_task(task or "causal_lm")


def load_base_model(model_dir: Path, quantization: str, task=None, info: Optional[dict[str, Any]] = None,
                    sharded: bool = False):
    """The task's model class at model_dir (a causal LM unless the task says otherwise), quantized
    as asked, on this process's GPU if there is one. A freshly initialised head stays out of
    quantization. sharded: the model will be FSDP-sharded, which moves each process's shard to its
    GPU; it stays on the CPU until then, so no GPU ever holds the whole model."""
    import torch

    kind = _kind(task)
    quiet_bitsandbytes()
    kwargs: dict[str, Any] = {"dtype": compute_dtype() if quantization != "none" else torch.float32,
                              **kind.model_kwargs(info or {})}
    skip = kind.trained_head(meta_model(model_dir, kind, info)) if quantization != "none" else None
    bnb = quantization_config(quantization, skip)
    if bnb is not None:
        # Under torchrun each worker holds a whole copy of the model on its own GPU.
        gpu = int(os.environ.get("LOCAL_RANK", 0))
        kwargs.update(quantization_config=bnb, device_map={"": gpu if device_kind() == "cuda" else "cpu"})
    model = kind.auto_model_class().from_pretrained(model_dir, **kwargs)
    if bnb is None and not sharded:
        # under torchrun, this worker's own GPU (a bare "cuda" is GPU 0 for every worker)
        model.to(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if device_kind() == "cuda" else "cpu")
    if quantization == "4bit" and device_kind() == "cpu":
        _cpu_4bit_workaround(model)
    return model


def meta_model(model_dir: Path, task=None, info: Optional[dict[str, Any]] = None):
    """The model's structure with no weights loaded: for preflight checks, costs milliseconds."""
    import torch
    from transformers import AutoConfig

    kind = _kind(task)
    config = AutoConfig.from_pretrained(model_dir, **kind.model_kwargs(info or {}))
    with torch.device("meta"):
        return kind.auto_model_class().from_config(config)


def check_model_type(value: str, model_dir: Path) -> None:
    """config.json's model_type is one this transformers knows. A model that brings its own code
    (auto_map, modeling_*.py) would otherwise end in a 40-line traceback asking for trust_remote_code
    (or a prompt on a terminal): kubetune never runs a model's own code."""
    import transformers
    from transformers import CONFIG_MAPPING

    config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    code = sorted(p.name for p in Path(model_dir).glob("*.py"))
    if code or config.get("auto_map"):
        where = ", ".join(code[:3]) + (" ..." if len(code) > 3 else "") if code else "auto_map in config.json"
        raise ModelError("model.name_or_path", value, f"model_type {model_type!r} needs the model's own code "
                         f"({where}: trust_remote_code), which kubetune does not run; use a model whose "
                         f"model_type transformers {transformers.__version__} knows (llama, gemma3, gpt2 ...), or "
                         "convert this one to such a type")
    raise ModelError("model.name_or_path", value, f"transformers {transformers.__version__} does not know model_type "
                     f"{model_type!r}; use a model of a type it knows (llama, gemma3, gpt2 ...), or a transformers "
                     "release that has this type (in the images too)")


#: config.json keys that hold how many positions a model has, as architectures name it.
POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


@dataclass(frozen=True)
class Positions:
    limit: int  # positions the model has (absolute) or was trained for (rotary and others)
    key: str  # the config key that says so
    absolute: bool  # learned absolute position embeddings: no position beyond `limit` exists

    def describe(self) -> str:
        kind = "learned absolute positions" if self.absolute else "positions it was trained for"
        return f"the model has {self.limit} {kind} ({self.key} in its config.json)"


def positions(model) -> Optional[Positions]:
    """How long a sequence the model takes (None where its config names no limit). Absolute when
    it has a learned position embedding (GPT-2's wpe, OPT's embed_positions, BERT's
    position_embeddings): a position beyond them is an index error, or a huge allocation first."""
    import torch

    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    values = config.to_dict()  # the keys as config.json spells them (GPT-2: n_positions)
    found = next(((key, values[key]) for key in POSITION_KEYS
                  if isinstance(values.get(key), int) and not isinstance(values[key], bool) and values[key] > 0), None)
    if found is None:
        return None
    embeddings = [module for name, module in model.named_modules() if isinstance(module, torch.nn.Embedding)
                  and ("pos" in name.rsplit(".", 1)[-1] or name.endswith("wpe"))]
    if not embeddings:
        return Positions(limit=found[1], key=found[0], absolute=False)
    # RoBERTa-style embeddings count positions from padding_idx + 1 (514 rows, 512 positions).
    table = embeddings[0]
    usable = table.num_embeddings - (table.padding_idx + 1 if table.padding_idx is not None else 0)
    return Positions(limit=min(found[1], usable), key=found[0], absolute=True)


def linear_module_names(model) -> list[str]:
    """Distinct last name components of the linear layers (the valid LoRA target_modules)."""
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and type(module).__name__ in LINEAR_CLASSES}
    return sorted(names)


def find_blocks(model) -> tuple[str, list]:
    """The transformer blocks: the longest ModuleList whose items all share one class.

    Works for OPT (decoder.layers), GPT-2 (transformer.h), Llama/Gemma (model.layers) and BERT
    (encoder.layer) without a table of architectures.
    """
    import torch

    best: tuple[str, list] = ("", [])
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best[1]):
            if len({type(child) for child in module}) == 1:
                best = (name, list(module))
    if not best[1]:
        raise ModelError("model.freeze_layers", "?", "could not find the transformer blocks of this model")
    return best


def check_target_modules(model, target_modules: list[str]) -> None:
    available = linear_module_names(model)
    missing = [name for name in target_modules if name not in available]
    if missing:
        raise ModelError("model.lora.target_modules", target_modules,
                         f"{', '.join(missing)} not in this model; its linear modules are: {', '.join(available)}")


def check_quantizable(model_dir: Path, model, quantization: str) -> None:
    if quantization == "none":
        return
    config = json.loads((Path(model_dir) / "config.json").read_text())
    existing = config.get("quantization_config")
    if existing:
        method = existing.get("quant_method", "another method")
        raise ModelError("model.quantization", quantization,
                         f"the model at {model_dir} is already quantized with {method}; set "
                         "model.quantization: none to train it as it is")
    if not linear_module_names(model):
        raise ModelError("model.quantization", quantization,
                         "the model has no linear layers bitsandbytes can quantize; set model.quantization: none")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelError("model.quantization", quantization,
                         "bitsandbytes is not installed; pip install bitsandbytes, or set model.quantization: "
                         "none") from None


def check_freeze(model, cfg: ModelConfig) -> int:
    _, blocks = find_blocks(model)
    if cfg.freeze_layers >= len(blocks) and cfg.lora is not None:
        raise ModelError("model.freeze_layers", cfg.freeze_layers,
                         f"the model has {len(blocks)} blocks; with LoRA, freeze fewer than {len(blocks)}")
    if cfg.freeze_layers > len(blocks):
        raise ModelError("model.freeze_layers", cfg.freeze_layers,
                         f"the model has only {len(blocks)} blocks; freeze at most {len(blocks)}")
    return len(blocks)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, all), counted the way PEFT's print_trainable_parameters counts them."""
    if hasattr(model, "get_nb_trainable_parameters"):
        return model.get_nb_trainable_parameters()
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":  # packed two values a byte, as in PEFT
            n = n * 2 * (param.element_size() if hasattr(param, "element_size") else 1)
        total += n
        trainable += n if param.requires_grad else 0
    return trainable, total


def trainable_line(trainable: int, total: int) -> str:
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def _cast_logits_to_fp32(model) -> None:
    # The recipe's CastOutputToFloat: the loss is computed from fp32 logits even when the rest
    # runs in half precision.
    output = model.get_output_embeddings()
    if output is not None:
        output.register_forward_hook(lambda module, inputs, out: out.float())


def prepare_for_training(model, cfg: ModelConfig, quantization: str, task=None):
    """Freeze what must not train, keep norms in fp32, checkpoint activations; returns the model
    ready for training (a PeftModel when LoRA is configured). A new task head always trains."""
    import torch

    kind = _kind(task)
    head = kind.trained_head(model) or []

    checkpoint_kwargs = {"use_reentrant": False}
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=checkpoint_kwargs)
    else:
        if cfg.lora is not None:
            for param in model.parameters():
                param.requires_grad_(False)
        for param in model.parameters():
            if param.ndim == 1 and param.dtype != torch.float32:
                param.data = param.data.float()
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
            model.enable_input_require_grads()
    _cast_logits_to_fp32(model)

    blocks_path, blocks = find_blocks(model)
    if cfg.lora is None:
        frozen = [model.get_input_embeddings(), *blocks[: cfg.freeze_layers]] if cfg.freeze_layers else []
        for module in frozen:
            for param in module.parameters():
                param.requires_grad_(False)
        for name in head:
            for param in model.get_submodule(name).parameters():
                param.requires_grad_(True)
        return model

    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    layer_kwargs: dict[str, Any] = {}
    if cfg.freeze_layers:
        layer_kwargs = {"layers_to_transform": list(range(cfg.freeze_layers, len(blocks))),
                        "layers_pattern": blocks_path.rsplit(".", 1)[-1]}
    peft_config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.target_modules), bias=lora.bias,
                             task_type=kind.peft_task_type, modules_to_save=head or None, **layer_kwargs)
    return get_peft_model(model, peft_config)


def memory_estimate(model, trainable: int) -> dict[str, int]:
    """Weights as loaded plus gradients and AdamW's two moments for the trainable share (fp32)."""
    weights = int(model.get_memory_footprint())
    return {"weights_bytes": weights, "train_state_bytes": trainable * 4 * 3,
            "estimated_total_bytes": weights + trainable * 12}


def prepare_model(model_dir: Path, cfg: ModelConfig, out_dir: Path, seed: int,
                  source: Optional[dict[str, Any]] = None, task=None,
                  info: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Load, quantize, freeze and adapt the base model; write the plan and the initial adapter
    (with the initial task head, so training and evaluation start from the same weights)."""
    import torch

    torch.manual_seed(seed)
    model = load_base_model(model_dir, cfg.quantization, task, info)
    model = prepare_for_training(model, cfg, cfg.quantization, task)
    trainable, total = count_parameters(model)
    line = trainable_line(trainable, total)
    log.info("prepare_model: %s", line)
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.lora is not None:
        model.save_pretrained(artifacts.initial_adapter_dir(out_dir))
    plan = {"name_or_path": cfg.name_or_path, "source": source or {}, "quantization": cfg.quantization,
            "device": device_kind(), "blocks": len(find_blocks(model)[1]), "freeze_layers": cfg.freeze_layers,
            "lora": None if cfg.lora is None else vars(cfg.lora), "trainable_params": trainable,
            "all_params": total, "trainable_percent": round(100 * trainable / total, 4),
            "trainable_line": line, "memory": memory_estimate(model, trainable)}
    artifacts.write_plan(out_dir, plan)
    return plan


def load_for_training(model_dir: Path, prepared_dir: Path, cfg: ModelConfig, task=None,
                      info: Optional[dict[str, Any]] = None, sharded: bool = False):
    """The model exactly as prepare_model left it: same quantization, frozen set and LoRA init.
    sharded: see load_base_model."""
    model = load_base_model(model_dir, cfg.quantization, task, info, sharded)
    if cfg.lora is None:
        return prepare_for_training(model, cfg, cfg.quantization, task)
    from peft import PeftModel

    lora_free = ModelConfig(**{**vars(cfg), "lora": None, "freeze_layers": 0})
    model = prepare_for_training(model, lora_free, cfg.quantization, task)
    for param in model.parameters():
        param.requires_grad_(False)
    return PeftModel.from_pretrained(model, artifacts.initial_adapter_dir(prepared_dir), is_trainable=True)


def load_tuned(model_dir: Path, tuned_dir: Path, cfg: ModelConfig, task=None, info: Optional[dict[str, Any]] = None):
    """Base model plus the trained adapter (or the fully trained weights when there is no LoRA)."""
    if cfg.lora is None:
        return load_base_model(tuned_dir, cfg.quantization, task, info)
    from peft import PeftModel

    model = load_base_model(model_dir, cfg.quantization, task, info)
    return PeftModel.from_pretrained(model, tuned_dir)


def masked_lm_model(model_dir: Path) -> tuple[Any, str]:
    """(the checkpoint as a masked-LM: encoder + its pretraining head, "") or (None, why not): the
    checkpoint may not ship that head (sentence encoders such as all-MiniLM-L6-v2 do not) or its
    architecture may have no masked-LM form (decoders)."""
    import transformers
    from transformers import AutoConfig, AutoModelForMaskedLM

    config = AutoConfig.from_pretrained(model_dir)
    if type(config) not in AutoModelForMaskedLM._model_mapping:
        return None, f"{config.model_type} has no masked-LM form, and a classification model keeps no LM head"
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the missing-head warning is expected; it is what we check
    try:
        model, loading = AutoModelForMaskedLM.from_pretrained(model_dir, output_loading_info=True)
    finally:
        transformers.logging.set_verbosity(verbosity)
    encoder = model.base_model_prefix + "."
    missing = sorted(key for key in loading["missing_keys"] if not key.startswith(encoder))
    if missing:
        return None, (f"the checkpoint ships no masked-LM head ({missing[0]} and {len(missing) - 1} more missing), "
                      "so the encoder's general-language skill cannot be scored")
    return model.eval(), ""


@dataclass
class Variants:
    """The base and the tuned model, each as a context manager factory, so evaluation compares them
    without holding two copies: with LoRA one PeftModel serves both (the base is the same model
    inside `disable_adapter()`); without it each is loaded when entered and dropped after."""

    base: Callable[[], ContextManager[Any]]
    tuned: Callable[[], ContextManager[Any]]


@contextlib.contextmanager
def _adapter_disabled(model) -> Iterator[Any]:
    with model.disable_adapter():
        yield model


@contextlib.contextmanager
def _loaded(load: Callable[[], Any], seed: int) -> Iterator[Any]:
    torch_seed(seed)
    model = load()
    try:
        yield model
    finally:
        del model


def torch_seed(seed: int) -> None:
    """Seed torch before loading a model whose checkpoint lacks a module (a new classification
    head): the module is then initialised the same way every run. Without it the draw depends on
    what was imported before (importing mlflow.pyfunc alone consumes torch's generator)."""
    import torch

    torch.manual_seed(seed)


def variants(model_dir: Path, tuned_dir: Path, cfg: ModelConfig, task=None,
             info: Optional[dict[str, Any]] = None, seed: int = 0) -> Variants:
    if cfg.lora is not None:
        torch_seed(seed)
        model = load_tuned(model_dir, tuned_dir, cfg, task, info)
        return Variants(base=lambda: _adapter_disabled(model), tuned=lambda: contextlib.nullcontext(model))
    return Variants(base=lambda: _loaded(lambda: load_base_model(model_dir, cfg.quantization, task, info), seed),
                    tuned=lambda: _loaded(lambda: load_tuned(model_dir, tuned_dir, cfg, task, info), seed))
