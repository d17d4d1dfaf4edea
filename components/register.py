from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config_json: str, run_id: str, lineage: Input[Artifact], tokenized: Input[Dataset],
             prepared_model: Input[Model], tuned_model: Input[Model], evaluation: Input[Artifact]) -> str:
    """Logs the adapter to MLflow and registers a new model version; returns name/version."""
    from kubetune import stages

    result = stages.register(config_json, run_id, lineage.path, tokenized.path, prepared_model.path,
                             tuned_model.path, evaluation.path)
    return f"{result['model_name']}/{result['version']}"
