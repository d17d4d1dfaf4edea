from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from kubetune.images import CUDA_IMAGE


@dsl.component(base_image=CUDA_IMAGE, install_kfp_package=False)
def prepare_model(config_json: str, run_id: str, tokenized: Input[Dataset], prepared_model: Output[Model],
                  accelerators: int = 0, accelerator_type: str = ""):
    """Quantizes, freezes and adds LoRA (sized to the task info in tokenized); writes the plan and the
    initial adapter. accelerators (of accelerator_type): what the pipeline granted, checked first."""
    from kubetune import stages

    plan = stages.prepare_model(config_json, run_id, tokenized.path, prepared_model.path, accelerators,
                                accelerator_type)
    prepared_model.metadata.update({k: plan[k] for k in ("trainable_params", "all_params", "trainable_percent")})
