from kfp import dsl
from kfp.dsl import Dataset, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def prepare_data(config_json: str, run_id: str, dataset: Output[Dataset]):
    """Reads, normalises and splits the data; writes train/validation JSONL and statistics."""
    from kubetune import stages

    stats = stages.prepare_data(config_json, run_id, dataset.path)
    dataset.metadata.update({k: v for k, v in stats.items() if isinstance(v, (int, float, str))})
