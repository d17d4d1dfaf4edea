"""The kubetune DAG. Everything Kubernetes-specific about it belongs in this folder.

What a cluster needs to know sits in two places below: the per-stage table `STAGES` (CPU, memory,
timeout, caching, retries) and the pipeline parameters (accelerator type and counts, the GPU node
selector). The Kubernetes objects the pods read (`kubetune-s3`, `kubetune-mlflow`,
`kubetune-hub-token`, `kubetune-endpoints`) are named here and created by kustomize/.

`kubetune run` executes this same function under kfp.local, which ignores the CPU, memory and
accelerator settings (one warning per task) and every kfp.kubernetes setting (silently). It honours
two: caching (only if local caching is switched on, which kubetune does not do) and `set_retry`: a
failing train is retried locally too, after the same backoff, and resumes from its last checkpoint.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from kfp import compiler, dsl, kubernetes

from kubetune.components import evaluate, finish_run, preflight, prepare_data, prepare_model, register, tokenize, train
from kubetune.config import default_config
from kubetune.config_outputs import WEBHOOK_ENV
from kubetune.images import CUDA_IMAGE
from kubetune.run_form import EMPTY_HELP, RUN_FORM, TRAIN, cluster_defaults

PIPELINE_NAME = "kubetune"
COMPILED = Path(__file__).with_name("kubetune_pipeline.yaml")

# Defaults of the cluster-facing pipeline parameters; `kubetune submit` sends the same names.
ACCELERATOR_TYPE = "nvidia.com/gpu"  # the NVIDIA device plugin's resource name
ACCELERATOR_COUNT = 1
GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # label set by NVIDIA GPU feature discovery
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}  # the usual GPU-pool taint

# Credentials reach the pods only as environment variables from Secrets, never as parameters.
# Secret name: its keys, each filling the environment variable of the same name. All optional: a
# cluster may give S3 access through the ServiceAccount's cloud identity, run MLflow without auth and
# use no gated hub model. A missing required Secret would leave the pod stuck in
# CreateContainerConfigError until its timeout; missing credentials that are needed make preflight
# fail within seconds instead, with a message, before any GPU is requested.
SECRETS_AS_ENV = {
    "kubetune-s3": ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"],
    "kubetune-mlflow": ["MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"],
    "kubetune-hub-token": ["HF_TOKEN"],
}
# The webhook notifications go to (kubetune.notify): only the exit handler, which sends them, reads it.
NOTIFY_SECRET = {"kubetune-notify": [WEBHOOK_ENV]}
ENDPOINTS_CONFIG_MAP = "kubetune-endpoints"  # required: without it the pods would not know where MLflow is
ENDPOINT_KEYS = ["MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"]  # what tracking.mlflow_uri / storage.endpoint_url fall back to


@dataclass(frozen=True)
class Stage:
    """How one task runs on a cluster. Requests are what the scheduler reserves, limits what the
    container may use; memory request = limit on the GPU stages so they are never the first evicted."""

    cpu: tuple[str, str]  # request, limit
    memory: tuple[str, str]  # request, limit
    timeout_minutes: int  # per attempt: the pod's activeDeadlineSeconds
    cache: bool  # reuse a previous execution with the very same inputs
    retries: int = 0


# Caching: every stage takes the run id that preflight opens, so a cache key can only match inside the
# same pipeline run (a retried run); across runs nothing is reused, and a cached stage can never leave
# a new MLflow run without its statistics. Off for preflight (it opens the MLflow run: a cached one
# would hand back an old run id), prepare_model, train (a hit would skip the checkpoints and per-step
# metrics the run must own), evaluate and register (they must see the model this run trained, and
# register moves the champion alias).
# Retries: train only. It resumes from the last checkpoint in storage, and what kills it is mostly
# the node (preemption, OOM kill, eviction); the other stages fail for reasons a retry does not fix.
# Memory of the data stages, measured on 1M rows (README "Data at production size"; flat in the row
# count from 1M to 3M): prepare_data 0.23 GB (PSS); preflight 1.16 GB with Gemma 3's tokenizer (262k
# vocabulary) and the model's skeleton; tokenize 3.8 GB (PSS of the pod's processes) with that
# tokenizer in 4 workers, one per CPU of its limit, each holding its own copy of the tokenizer.
STAGES = {
    "preflight": Stage(cpu=("1", "2"), memory=("2Gi", "3Gi"), timeout_minutes=20, cache=False),
    "prepare_data": Stage(cpu=("1", "2"), memory=("1Gi", "2Gi"), timeout_minutes=60, cache=True),
    "tokenize": Stage(cpu=("2", "4"), memory=("8Gi", "8Gi"), timeout_minutes=60, cache=True),
    "prepare_model": Stage(cpu=("4", "8"), memory=("32Gi", "32Gi"), timeout_minutes=60, cache=False),
    "train": Stage(cpu=("8", "8"), memory=("64Gi", "64Gi"), timeout_minutes=24 * 60, cache=False, retries=2),
    "evaluate": Stage(cpu=("4", "8"), memory=("32Gi", "32Gi"), timeout_minutes=4 * 60, cache=False),
    # register loads the base and the adapter once on the CPU: MLflow checks the input example by
    # predicting it (an 8-bit 6.7B base is about 7 GB).
    "register": Stage(cpu=("4", "8"), memory=("32Gi", "32Gi"), timeout_minutes=60, cache=False),
    "finish_run": Stage(cpu=("100m", "1"), memory=("1Gi", "2Gi"), timeout_minutes=10, cache=False),
}
# train.nodes > 1: the pods of the TrainJob's nodes (kubetune.trainjob.NodeSettings). Each node is
# sized like the train task and gets the same endpoints and credentials; its GPUs (train.processes of
# accelerator_type) and the GPU pool's node selector come from the run's parameters, the toleration
# here. The train task itself then only follows the job; the job's deadline is the task's, so nodes
# whose task was killed outright (and so could not delete the job) stop when it would have.
TRAIN_NODES = {
    "image": CUDA_IMAGE,
    "cpu": STAGES["train"].cpu[1],
    "memory": STAGES["train"].memory[1],
    "tolerations": [GPU_TOLERATION],
    "config_maps": {ENDPOINTS_CONFIG_MAP: ENDPOINT_KEYS},
    "secrets": SECRETS_AS_ENV,
    "deadline_seconds": STAGES["train"].timeout_minutes * 60,  # per attempt, as the task's own timeout
}
RETRY_BACKOFF = {"backoff_duration": "30s", "backoff_factor": 2.0, "backoff_max_duration": "3600s"}


def _on_cluster(task: dsl.PipelineTask, stage: str) -> dsl.PipelineTask:
    """Size, time-box, cache/retry and connect one task as STAGES[stage] says."""
    settings = STAGES[stage]
    task.set_cpu_request(settings.cpu[0]).set_cpu_limit(settings.cpu[1])
    task.set_memory_request(settings.memory[0]).set_memory_limit(settings.memory[1])
    kubernetes.set_timeout(task, seconds=settings.timeout_minutes * 60)
    task.set_caching_options(enable_caching=settings.cache)
    if settings.retries:
        task.set_retry(num_retries=settings.retries, **RETRY_BACKOFF)
    return _connect(task)


def _connect(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """Endpoints from the ConfigMap, credentials from the Secrets, all as environment variables.
    Every stage gets them: each one logs to the MLflow run and may read s3:// or the hub."""
    kubernetes.use_config_map_as_env(task, ENDPOINTS_CONFIG_MAP, {key: key for key in ENDPOINT_KEYS})
    for secret, keys in SECRETS_AS_ENV.items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys}, optional=True)
    return task


def _notifying(task: dsl.PipelineTask) -> dsl.PipelineTask:
    """The exit handler also gets the webhook's URL (optional: without it nothing is sent)."""
    for secret, keys in NOTIFY_SECRET.items():
        kubernetes.use_secret_as_env(task, secret, {key: key for key in keys}, optional=True)
    return task


def _on_gpus(task: dsl.PipelineTask, accelerator_type, count, node_selector: Optional[dict]) -> dsl.PipelineTask:
    """Accelerators on a GPU node: the limit, the GPU pool's node labels and its taint."""
    task.set_accelerator_type(accelerator_type).set_accelerator_limit(count)
    kubernetes.add_node_selector_json(task, node_selector)
    kubernetes.add_toleration(task, **GPU_TOLERATION)
    return task


def kubetune_pipeline(
    config_json: str = json.dumps(cluster_defaults(default_config())),
    task: Optional[str] = None,
    base_model: Optional[str] = None,
    quantization: Optional[str] = None,
    train_data: Optional[str] = None,
    text_field: Optional[str] = None,
    label_field: Optional[str] = None,
    instruction_field: Optional[str] = None,
    input_field: Optional[str] = None,
    messages_field: Optional[str] = None,
    epochs: Optional[float] = None,
    max_steps: Optional[int] = None,
    learning_rate: Optional[float] = None,
    lora_r: Optional[int] = None,
    lora_alpha: Optional[int] = None,
    eval_samples: Optional[int] = None,
    model_name: Optional[str] = None,
    experiment: Optional[str] = None,
    storage_uri: Optional[str] = None,
    when_data_changes: bool = False,
    accelerator_type: str = ACCELERATOR_TYPE,
    accelerator_count: int = ACCELERATOR_COUNT,
    gpu_node_selector: dict = GPU_NODE_SELECTOR,
    resume_run_id: str = "",
) -> None:
    # The whole run config travels as one JSON string: KFP struct parameters cannot hold null,
    # and null is meaningful here (lora: null = no LoRA). The run form's parameters are applied
    # over it in preflight, and every later task takes preflight's resulting config.
    # accelerator_count sizes prepare_model and evaluate. train gets one accelerator per training
    # process: train.processes in the config is the only place that number is set, and preflight
    # hands it on (none when accelerator_count is 0).
    # The exit handler runs when everything inside it has ended, however it ended.
    with dsl.ExitHandler(_notifying(_on_cluster(finish_run(config_json=config_json,
                                                           pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER), "finish_run"))):
        # preflight tags the run with accelerator_type; taking it as an input also makes KFP's compiler
        # hand it into the exit handler's group, where set_accelerator_type alone does not (kfp 2.17).
        checked = _on_cluster(preflight(
            config_json=config_json, accelerator_count=accelerator_count, accelerator_type=accelerator_type,
            resume_run_id=resume_run_id, when_data_changes=when_data_changes,
            pipeline_run=dsl.PIPELINE_JOB_ID_PLACEHOLDER, task=task, base_model=base_model,
            quantization=quantization, train_data=train_data, text_field=text_field, label_field=label_field,
            instruction_field=instruction_field, input_field=input_field, messages_field=messages_field,
            epochs=epochs, max_steps=max_steps, learning_rate=learning_rate, lora_r=lora_r, lora_alpha=lora_alpha,
            eval_samples=eval_samples, model_name=model_name, experiment=experiment, storage_uri=storage_uri),
            "preflight")
        config, run_id = checked.outputs["config"], checked.outputs["run_id"]
        # Each GPU stage takes its accelerator count and type as inputs too (it checks its pod sees them):
        # without that, KFP's compiler (2.17) hands a value used only in a resource setting into neither
        # the exit handler's nor the dsl.If's group, and the placeholder would not resolve.
        # when_data_changes: preflight compares the data's content hash with the one the champion was
        # trained on and answers "skip" when they match; then nothing below runs and no GPU is asked for.
        with dsl.If(checked.outputs["verdict"] == TRAIN, name="data-changed-or-forced"):
            data = _on_cluster(prepare_data(config_json=config, run_id=run_id), "prepare_data")
            tokens = _on_cluster(tokenize(config_json=config, run_id=run_id, dataset=data.outputs["dataset"]), "tokenize")
            prepared = _on_cluster(prepare_model(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"],
                                                 accelerators=accelerator_count, accelerator_type=accelerator_type),
                                   "prepare_model")
            _on_gpus(prepared, accelerator_type, accelerator_count, gpu_node_selector)
            trained = _on_cluster(train(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"],
                                        prepared_model=prepared.outputs["prepared_model"],
                                        accelerators=checked.outputs["train_accelerators"],
                                        accelerator_type=accelerator_type, node_settings=TRAIN_NODES,
                                        node_selector=gpu_node_selector), "train")
            _on_gpus(trained, accelerator_type, checked.outputs["train_accelerators"], gpu_node_selector)
            evaluated = _on_cluster(evaluate(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"],
                                             tuned_model=trained.outputs["tuned_model"], accelerators=accelerator_count,
                                             accelerator_type=accelerator_type), "evaluate")
            _on_gpus(evaluated, accelerator_type, accelerator_count, gpu_node_selector)
            _on_cluster(register(config_json=config, run_id=run_id, lineage=checked.outputs["lineage"],
                                 tokenized=tokens.outputs["tokenized"], prepared_model=prepared.outputs["prepared_model"],
                                 tuned_model=trained.outputs["tuned_model"], evaluation=evaluated.outputs["evaluation"]),
                        "register")
    # KFP cannot return an output from inside an exit handler: the registered version is register's
    # `registered_model` artifact, and the MLflow run's kubetune.registered_version tag.


def _describe_parameters() -> str:
    """The pipeline's docstring: KFP shows each Args entry beside its field in the run form."""
    lines = ["Fine-tune a language model: preflight, data, tokenize, model prep, train, evaluate, register; "
             "one MLflow run per pipeline run.", "", "Args:",
             "    config_json: The whole run config as JSON (kubetune's config reference); the parameters "
             "below are applied over it.",
             *(f"    {field.parameter}: {field.help} {EMPTY_HELP}" for field in RUN_FORM),
             "    accelerator_type: Resource name of the GPUs the GPU stages ask for.",
             "    accelerator_count: GPUs for prepare_model and evaluate (train gets one per train.processes); "
             "0 runs them on CPUs.",
             "    gpu_node_selector: Node labels of the GPU pool.",
             "    resume_run_id: An MLflow run whose pipeline run died: this run continues it with the same "
             "config, train resuming from its last stored checkpoint.",
             "    when_data_changes: Train only when the training data differs (sha256 of its content) from what "
             "the current champion was trained on; otherwise the run ends after preflight as skipped."]
    return "\n".join(lines)


kubetune_pipeline.__doc__ = _describe_parameters()
kubetune_pipeline = dsl.pipeline(name=PIPELINE_NAME)(kubetune_pipeline)


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(kubetune_pipeline, package_path=str(path))
    return path
