from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(config_json: str, accelerator_count: int, lineage: Output[Artifact], resume_run_id: str = ""
              ) -> NamedTuple("PreflightOutputs", run_id=str, train_accelerators=int):
    """Checks config, data, model fit, MLflow and storage; opens the MLflow run (or reopens
    resume_run_id, whose stored checkpoints train then resumes from). Returns its id and the GPUs
    train needs (one per train.processes); writes the run's lineage for register."""
    from collections import namedtuple

    from kubetune import stages

    run_id = stages.preflight(config_json, lineage.path, accelerator_count, resume_run_id)
    train_accelerators = stages.train_accelerators(config_json, accelerator_count)
    return namedtuple("PreflightOutputs", ["run_id", "train_accelerators"])(run_id, train_accelerators)
