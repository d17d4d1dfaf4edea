"""The memory limit a container gets under `kubetune run --runner container`: the compiled pipeline's
limit for the stage's pod (pipelines/pipeline.py STAGES), parsed from its Kubernetes quantity. The
containers themselves run in tests/deploy/test_containers_run.py."""

from kubetune.launch.container_runner import memory_limit
from kubetune.pipelines.pipeline import STAGES


def test_every_stage_limit_parses_to_the_bytes_kubernetes_means():
    for stage, settings in STAGES.items():
        limit = memory_limit(stage)
        assert limit is not None and limit[1] == settings.memory[1], stage
    assert memory_limit("finish_run")[0] == int(STAGES["finish_run"].memory[1][:-2]) * 2**30
    assert memory_limit("a task the pipeline does not know") is None
