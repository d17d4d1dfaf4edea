from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(config_json: str, accelerator_count: int, lineage: Output[Artifact], accelerator_type: str = "",
              base_model: str = "",
              train_data: str = "", max_steps: int = 0, learning_rate: float = 0.0, lora_r: int = 0,
              lora_alpha: int = 0, model_name: str = "", experiment: str = "", storage_uri: str = "",
              resume_run_id: str = "", pipeline_run: str = ""
              ) -> NamedTuple("PreflightOutputs", config=str, run_id=str, train_accelerators=int):
    """Applies the run form (kubetune.run_form.RUN_FORM: base_model ... storage_uri) to config_json,
    checks config, data, model fit, MLflow and storage, and opens the MLflow run (or reopens
    resume_run_id, whose stored checkpoints train then resumes from). Returns the config every later
    task uses, the run's id and the GPUs train needs; writes the run's lineage for register."""
    from collections import namedtuple

    from kubetune import stages

    form = {"base_model": base_model, "train_data": train_data, "max_steps": max_steps,
            "learning_rate": learning_rate, "lora_r": lora_r, "lora_alpha": lora_alpha, "model_name": model_name,
            "experiment": experiment, "storage_uri": storage_uri}
    config = stages.run_config(config_json, form)
    run_id = stages.preflight(config, lineage.path, accelerator_count, resume_run_id, pipeline_run, accelerator_type)
    outputs = namedtuple("PreflightOutputs", ["config", "run_id", "train_accelerators"])
    return outputs(config, run_id, stages.train_accelerators(config, accelerator_count))
