"""kubetune: fine-tune language models as a Kubeflow Pipelines DAG that logs to MLflow and S3."""

__version__ = "0.1.0"
