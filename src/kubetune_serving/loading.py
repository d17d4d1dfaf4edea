"""Loading a registered version: its tokenizer, the base model, and the adapter on top.

The base model is not in the registry (a 6.7B base would be 13 GB per version). It is loaded from
the first of:

1. $KUBETUNE_BASE_MODEL_PATH, a local folder holding the base snapshot (set it where the base is
   somewhere else than at registration, e.g. a serving container with the base mounted);
2. settings `base_model_path`, the folder the base was resolved to at registration, if it exists;
3. settings `base_model` as configured, when it is a local folder or a hub id (transformers
   downloads it). `package:` and `s3://` bases need kubetune to resolve: set the variable.

A base trained on in 8-bit or 4-bit is loaded that way when bitsandbytes imports, else at full
precision with one warning: the adapter works on either; the predictions then differ from the
evaluated ones by the base's quantization error (docs/mlflow.md, on `kubetune export`, has its size).
The task kind's decisions (model class, config overrides such as id2label and pad_token_id,
modules kept out of quantization) reach this module as data in settings.json, as registration
computed them. kubetune.tokenization and kubetune.modeling take load_tokenizer, compute_dtype and
quantization_config from here, so training and serving set them up alike.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)

#: Where the base model is when it is not where the settings say (see the module docstring).
BASE_MODEL_ENV = "KUBETUNE_BASE_MODEL_PATH"


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        # Decoder-only models often ship without a pad token; padding with EOS is the usual fix and
        # the attention mask keeps the padding out of the loss.
        tokenizer.pad_token = tokenizer.eos_token
    # Training passes no position ids, so the model numbers positions from the left edge of the
    # batch: left padding (Gemma's converted tokenizer has it) would shift every shorter row's
    # positions and inflate its loss (measured: Gemma 270M 4-bit perplexity 66 alone, 329 in padded
    # batches). Scoring and generation pad on the left and pass their own positions.
    tokenizer.padding_side = "right"
    return tokenizer


def compute_dtype():
    """fp32 on the CPU; bf16 on GPUs that support it, else fp16."""
    import torch

    if not torch.cuda.is_available():
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def quantization_config(quantization: str, skip_modules: Optional[list[str]] = None):
    """bitsandbytes settings for `8bit` or `4bit` (NF4, double quantization), None for `none`;
    skip_modules stay unquantized (a new task head)."""
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype(), llm_int8_skip_modules=skip_modules)
    return None


def _is_hub_id(value: str) -> bool:
    # As kubetune.model_source: hub ids are `name` or `org/name`; anything else is a path or a URI.
    return bool(value) and ":" not in value and value.count("/") <= 1 and not value.startswith((".", "~", "/"))


def base_model_location(settings: dict[str, Any]) -> str:
    """The local folder (or hub id) to load the base model from: see the module docstring."""
    override = os.environ.get(BASE_MODEL_ENV, "").strip()
    if override:
        if not (Path(override).expanduser() / "config.json").is_file():
            raise FileNotFoundError(f"{BASE_MODEL_ENV}={override} is not a model folder (no config.json there); "
                                    f"point it at the base model {settings.get('base_model')!r}")
        return str(Path(override).expanduser())
    recorded = settings.get("base_model_path")
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    configured = str(settings.get("base_model", "")).strip()
    if configured and (Path(configured).expanduser() / "config.json").is_file():
        return str(Path(configured).expanduser())
    if _is_hub_id(configured):
        return configured
    raise FileNotFoundError(
        f"the base model {configured!r} is not here (at registration it was at {recorded!r}); set {BASE_MODEL_ENV} "
        "to a local folder holding it (a `package:` or `s3://` base needs kubetune to fetch it)")


def _load_kwargs(settings: dict[str, Any]) -> dict[str, Any]:
    """from_pretrained's arguments: the task's config overrides and, as training loaded the base,
    the quantization (fp32 compute on the CPU, bf16 or fp16 on a GPU) with the task head kept out."""
    import torch

    kwargs: dict[str, Any] = {"dtype": torch.float32, **(settings.get("model_kwargs") or {})}
    quantization = settings.get("quantization", "none")
    if quantization not in ("8bit", "4bit"):
        return kwargs
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        log.warning("bitsandbytes is not installed: loading the base at full precision, not %s as trained (the "
                    "adapter works on it; predictions differ by the base's quantization error)", quantization)
        return kwargs
    config = quantization_config(quantization, settings.get("unquantized_modules"))
    device = 0 if torch.cuda.is_available() else "cpu"
    return {**kwargs, "dtype": compute_dtype(), "quantization_config": config, "device_map": {"": device}}


def load_model(settings: dict[str, Any], adapter_dir: Path):
    """The base plus the adapter (PeftModel), or the full trained weights when trained without LoRA."""
    import torch
    import transformers

    auto = getattr(transformers, settings.get("model_class", "AutoModelForCausalLM"))
    kwargs = _load_kwargs(settings)
    if not settings.get("lora", True):
        model = auto.from_pretrained(adapter_dir, **kwargs)
    else:
        base = base_model_location(settings)
        try:
            model = auto.from_pretrained(base, **kwargs)
        except OSError as exc:  # a hub id that is neither cached nor reachable
            raise OSError(f"could not load the base model {base!r} ({exc}); set {BASE_MODEL_ENV} to a local folder "
                          "holding it") from exc
    if "quantization_config" not in kwargs:
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    if settings.get("lora", True):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


