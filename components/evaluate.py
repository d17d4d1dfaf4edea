from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from kubetune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, run_id: str, tokenized: Input[Dataset], tuned_model: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics]):
    """Scores base and tuned model on held-out data; metrics also go to the KFP UI."""
    from kubetune import stages

    scores = stages.evaluate(config_json, run_id, tokenized.path, tuned_model.path, evaluation.path)
    for name, value in scores.items():
        metrics.log_metric(name, value)
