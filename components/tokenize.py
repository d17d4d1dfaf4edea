from kfp import dsl
from kfp.dsl import Dataset, Input, Output

from kubetune.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def tokenize(config_json: str, run_id: str, dataset: Input[Dataset], tokenized: Output[Dataset]):
    """Tokenizes both splits with the base model's tokenizer."""
    from kubetune import stages

    tokenized.metadata.update(stages.tokenize(config_json, run_id, dataset.path, tokenized.path))
