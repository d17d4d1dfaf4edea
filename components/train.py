from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kubetune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def train(config_json: str, run_id: str, tokenized: Input[Dataset], prepared_model: Input[Model],
          tuned_model: Output[Model], accelerators: int = 0, accelerator_type: str = "", node_settings: dict = {},
          node_selector: dict = {}):
    """Trains with the transformers Trainer; writes the adapter and tokenizer. accelerators (of
    accelerator_type): what the pipeline granted, checked first. node_settings: the pods of a
    TrainJob's nodes when train.nodes > 1, on the nodes node_selector picks."""
    from kubetune import stages

    summary = stages.train(config_json, run_id, tokenized.path, prepared_model.path, tuned_model.path, accelerators,
                           accelerator_type, node_settings, node_selector)
    tuned_model.metadata.update({k: v for k, v in summary.items() if isinstance(v, (int, float))})
