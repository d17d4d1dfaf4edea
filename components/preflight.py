from kfp import dsl

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def preflight(config_json: str) -> str:
    """Checks config, data, model fit, MLflow and storage; opens the MLflow run and returns its id."""
    from kubetune import stages

    return stages.preflight(config_json)
