from kfp import dsl
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Input, Metrics, Model, Output

from kubetune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def evaluate(config_json: str, run_id: str, tokenized: Input[Dataset], tuned_model: Input[Model],
             evaluation: Output[Artifact], metrics: Output[Metrics], confusion_matrix: Output[ClassificationMetrics],
             report: Output[HTML], accelerators: int = 0, accelerator_type: str = ""):
    """Scores base and tuned model on held-out data; for the KFP UI also the metrics, the tuned
    model's confusion matrix (classification) and a report page (headline table, loss curve, examples).
    accelerators (of accelerator_type): what the pipeline granted, checked first."""
    import shutil

    from kubetune import stages

    scores = stages.evaluate(config_json, run_id, tokenized.path, tuned_model.path, evaluation.path, accelerators,
                             accelerator_type)
    for name, value in scores.items():
        metrics.log_metric(name, value)
    confusion, page = stages.evaluation_views(evaluation.path)
    if confusion:
        confusion_matrix.log_confusion_matrix(confusion["labels"], confusion["tuned"])
    shutil.copyfile(page, report.path)
