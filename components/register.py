from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(config_json: str, run_id: str, lineage: Input[Artifact], tokenized: Input[Dataset],
             prepared_model: Input[Model], tuned_model: Input[Model], evaluation: Input[Artifact],
             registered_model: Output[Model]):
    """Logs the model to MLflow and registers a new version; the output artifact's metadata holds its
    name, version, MLflow model URI and whether it became the champion."""
    import json

    from kubetune import stages

    result = stages.register(config_json, run_id, lineage.path, tokenized.path, prepared_model.path,
                             tuned_model.path, evaluation.path)
    registered_model.metadata.update(result)
    with open(registered_model.path, "w") as out:
        json.dump(result, out)
