from kfp import dsl

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def finish_run(config_json: str, pipeline_run: str, status: dsl.PipelineTaskFinalStatus):
    """The exit handler: a pipeline run that failed, was killed or timed out leaves its MLflow run
    FAILED with the stage it was in, never RUNNING."""
    from kubetune import stages

    print(stages.finish_run(config_json, pipeline_run, status.state, status.error_message or ""))
