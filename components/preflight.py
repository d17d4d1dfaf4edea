from typing import NamedTuple, Optional

from kfp import dsl
from kfp.dsl import Artifact, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(config_json: str, accelerator_count: int, lineage: Output[Artifact], accelerator_type: str = "",
              task: Optional[str] = None, base_model: Optional[str] = None, quantization: Optional[str] = None,
              train_data: Optional[str] = None, text_field: Optional[str] = None, label_field: Optional[str] = None,
              instruction_field: Optional[str] = None, input_field: Optional[str] = None,
              messages_field: Optional[str] = None, epochs: Optional[float] = None, max_steps: Optional[int] = None,
              learning_rate: Optional[float] = None, lora_r: Optional[int] = None, lora_alpha: Optional[int] = None,
              eval_samples: Optional[int] = None, model_name: Optional[str] = None, experiment: Optional[str] = None,
              storage_uri: Optional[str] = None, when_data_changes: bool = False, resume_run_id: str = "",
              pipeline_run: str = ""
              ) -> NamedTuple("PreflightOutputs", config=str, run_id=str, train_accelerators=int, verdict=str):
    """Applies the run form (kubetune.run_form.RUN_FORM: task ... storage_uri) to config_json, checks
    config, data, model fit, MLflow and storage, and opens the MLflow run (or reopens resume_run_id).
    With when_data_changes, a run whose data the champion was trained on ends here: verdict "skip".
    Returns the config every later task uses, the run's id, the GPUs train needs and the verdict;
    writes the run's lineage for register."""
    from collections import namedtuple

    from kubetune import stages

    config = stages.run_config(config_json, stages.run_form_values(locals()))
    run_id, verdict = stages.preflight(config, lineage.path, accelerator_count, resume_run_id, pipeline_run,
                                       accelerator_type, when_data_changes)
    outputs = namedtuple("PreflightOutputs", ["config", "run_id", "train_accelerators", "verdict"])
    return outputs(config, run_id, stages.train_accelerators(config, accelerator_count), verdict)
