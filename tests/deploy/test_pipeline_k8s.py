"""Every Kubernetes setting of the pipeline, read back from the committed compiled YAML: what the
cluster will be given. (tests/deploy/test_compile.py keeps that YAML equal to a fresh compile.)"""

import json
import re

import pytest
import yaml

from kubetune.pipelines.pipeline import COMPILED, STAGES
from kubetune.run_form import RUN_FORM

TASKS = ["preflight", "prepare-data", "tokenize", "prepare-model", "train", "evaluate", "register", "finish-run"]
EXIT_HANDLER = "comp-exit-handler-1"  # the group that holds preflight and the rest; finish-run is its exit task
TRAINING = "comp-condition-2"  # inside it, the dsl.If that holds the six stages after preflight
# Where each GPU task's accelerator count comes from: a pipeline parameter, or preflight's output
# (train: one per train.processes).
GPU_TASKS = {"prepare-model": "accelerator_count", "train": "preflight-train_accelerators",
             "evaluate": "accelerator_count"}
CACHED = {"prepare-data", "tokenize"}


@pytest.fixture(scope="module")
def compiled():
    pipeline_spec, platform_spec = yaml.safe_load_all(COMPILED.read_text())
    return pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def task_spec(compiled, task):
    for dag in (compiled[0]["root"]["dag"], *(compiled[0]["components"][group]["dag"] for group in (EXIT_HANDLER, TRAINING))):
        if task in dag["tasks"]:
            return dag["tasks"][task]
    raise KeyError(task)


def executor_label(compiled, task):
    spec = compiled[0]
    return spec["components"][task_spec(compiled, task)["componentRef"]["name"]]["executorLabel"]


def resources(compiled, task):
    return compiled[0]["deploymentSpec"]["executors"][executor_label(compiled, task)]["container"]["resources"]


def kubernetes(compiled, task):
    return compiled[1][executor_label(compiled, task)]


def placeholder(parameter):
    return f"{{{{$.inputs.parameters['pipelinechannel--{parameter}']}}}}"


def quantity(text):
    """A Kubernetes CPU or memory quantity as a number (enough of the grammar for these values)."""
    number, unit = re.fullmatch(r"([0-9.]+)(m|Ki|Mi|Gi|Ti)?", text).groups()
    return float(number) * {None: 1, "m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[unit]


def test_cluster_parameters_and_their_defaults(compiled):
    parameters = {name: {k: v for k, v in spec.items() if k != "description"}  # test_compile checks those
                  for name, spec in compiled[0]["root"]["inputDefinitions"]["parameters"].items()}
    assert set(parameters) == {"config_json", "accelerator_type", "accelerator_count", "gpu_node_selector",
                               "resume_run_id", "when_data_changes", *(field.parameter for field in RUN_FORM)}
    assert parameters["when_data_changes"] == {"defaultValue": False, "isOptional": True, "parameterType": "BOOLEAN"}
    assert parameters["resume_run_id"] == {"defaultValue": "", "isOptional": True, "parameterType": "STRING"}
    assert parameters["accelerator_type"] == {"defaultValue": "nvidia.com/gpu", "isOptional": True,
                                              "parameterType": "STRING"}
    assert parameters["accelerator_count"] == {"defaultValue": 1.0, "isOptional": True,
                                               "parameterType": "NUMBER_INTEGER"}
    assert parameters["gpu_node_selector"] == {"defaultValue": {"nvidia.com/gpu.present": "true"},
                                               "isOptional": True, "parameterType": "STRUCT"}


@pytest.mark.parametrize("task", TASKS)
def test_accelerators_come_from_the_parameters_on_gpu_stages_only(compiled, task):
    accelerator = resources(compiled, task).get("accelerator")
    if task not in GPU_TASKS:
        assert accelerator is None
        return
    assert accelerator == {"resourceType": placeholder("accelerator_type"),
                           "resourceCount": placeholder(GPU_TASKS[task])}
    inputs = task_spec(compiled, task)["inputs"]["parameters"]
    # inside the exit handler's group, pipeline parameters arrive as the group's own inputs
    assert inputs["pipelinechannel--accelerator_type"] == {"componentInputParameter": "pipelinechannel--accelerator_type"}
    if GPU_TASKS[task] == "accelerator_count":
        assert inputs["pipelinechannel--accelerator_count"] == {
            "componentInputParameter": "pipelinechannel--accelerator_count"}
    else:  # preflight's output, handed into the dsl.If's group by the group's task
        assert inputs[f"pipelinechannel--{GPU_TASKS[task]}"] == {
            "componentInputParameter": f"pipelinechannel--{GPU_TASKS[task]}"}
        gate = compiled[0]["components"][EXIT_HANDLER]["dag"]["tasks"]["condition-2"]["inputs"]["parameters"]
        assert gate[f"pipelinechannel--{GPU_TASKS[task]}"] == {
            "taskOutputParameter": {"producerTask": "preflight", "outputParameterKey": "train_accelerators"}}


def test_train_asks_for_one_accelerator_per_training_process():
    """train.processes is the one place the count is set; preflight hands it to train's limit."""
    from kubetune.stages import train_accelerators

    config = {"train": {"processes": 4}}
    assert train_accelerators(json.dumps(config), accelerator_count=1) == 4
    assert train_accelerators(config, accelerator_count=2) == 4
    assert train_accelerators(config, accelerator_count=0) == 0, "a cluster without GPUs asks for none"


@pytest.mark.parametrize("task", TASKS)
def test_gpu_stages_select_and_tolerate_gpu_nodes(compiled, task):
    settings = kubernetes(compiled, task)
    if task not in GPU_TASKS:
        assert "tolerations" not in settings and "nodeSelector" not in settings
        return
    assert settings["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert settings["nodeSelector"] == {"nodeSelectorJson": {"componentInputParameter": "pipelinechannel--gpu_node_selector"}}


@pytest.mark.parametrize("task", TASKS)
def test_cpu_and_memory_requests_and_limits(compiled, task):
    stage = STAGES[task.replace("-", "_")]
    sized = resources(compiled, task)
    assert (sized["resourceCpuRequest"], sized["resourceCpuLimit"]) == stage.cpu
    assert (sized["resourceMemoryRequest"], sized["resourceMemoryLimit"]) == stage.memory
    assert quantity(stage.cpu[0]) <= quantity(stage.cpu[1]) and quantity(stage.memory[0]) <= quantity(stage.memory[1])
    if task in GPU_TASKS:  # never the first evicted when a GPU node runs short of memory
        assert stage.memory[0] == stage.memory[1]
    # the deprecated float fields, for KFP backends older than the resource* fields, agree
    assert sized["cpuLimit"] == quantity(stage.cpu[1]) and sized["memoryLimit"] == quantity(stage.memory[1]) / 1e9


@pytest.mark.parametrize("task", TASKS)
def test_credentials_and_endpoints_arrive_as_env_from_secrets_and_a_config_map(compiled, task):
    settings = kubernetes(compiled, task)
    secrets = {s["secretName"]: ({m["secretKey"]: m["envVar"] for m in s["keyToEnv"]}, s["optional"])
               for s in settings["secretAsEnv"]}
    # optional: credentials may come from the ServiceAccount's cloud identity or be unneeded, and a
    # missing required Secret would hang the pod instead of failing preflight with a message
    assert secrets == {
        "kubetune-s3": ({"AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY"},
                        True),
        "kubetune-mlflow": ({"MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
                             "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD"}, True),
        "kubetune-hub-token": ({"HF_TOKEN": "HF_TOKEN"}, True),
        # the webhook's URL: only the exit handler sends notifications
        **({"kubetune-notify": ({"KUBETUNE_WEBHOOK_URL": "KUBETUNE_WEBHOOK_URL"}, True)} if task == "finish-run" else {}),
    }
    (config_map,) = settings["configMapAsEnv"]
    assert config_map["configMapName"] == "kubetune-endpoints" and config_map["optional"] is False
    assert {m["configMapKey"]: m["envVar"] for m in config_map["keyToEnv"]} == {
        "MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL": "AWS_ENDPOINT_URL"}


def test_no_credential_travels_as_a_parameter_or_plain_env(compiled):
    spec = compiled[0]
    secret_like = re.compile(r"KEY|SECRET|PASSWORD|TOKEN|USERNAME", re.IGNORECASE)
    assert not [name for name in spec["root"]["inputDefinitions"]["parameters"] if secret_like.search(name)]
    assert not [label for label, executor in spec["deploymentSpec"]["executors"].items()
                if executor["container"].get("env")]
    config = json.loads(spec["root"]["inputDefinitions"]["parameters"]["config_json"]["defaultValue"])
    assert not secret_like.search(json.dumps(sorted(config)))


@pytest.mark.parametrize("task", TASKS)
def test_retries_with_backoff_on_train_only(compiled, task):
    policy = task_spec(compiled, task).get("retryPolicy")
    if task != "train":
        assert policy is None
        return
    assert policy == {"maxRetryCount": 2, "backoffDuration": "30s", "backoffFactor": 2.0,
                      "backoffMaxDuration": "3600s"}


@pytest.mark.parametrize("task", TASKS)
def test_caching_only_for_data_and_tokens(compiled, task):
    assert task_spec(compiled, task)["cachingOptions"].get("enableCache", False) is (task in CACHED)


@pytest.mark.parametrize("task", TASKS)
def test_every_task_has_a_timeout(compiled, task):
    seconds = int(kubernetes(compiled, task)["activeDeadlineSeconds"])
    assert seconds == STAGES[task.replace("-", "_")].timeout_minutes * 60
    assert seconds >= (3600 if task == "train" else 600)


def test_gpu_stages_run_the_cuda_image(compiled):
    for task in TASKS:
        image = compiled[0]["deploymentSpec"]["executors"][executor_label(compiled, task)]["container"]["image"]
        assert ("kubetune-cuda:" in image) is (task in GPU_TASKS), (task, image)
