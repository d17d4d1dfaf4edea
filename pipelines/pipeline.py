"""The kubetune DAG. Everything Kubernetes-specific about it belongs in this folder."""

import json
from pathlib import Path

from kfp import compiler, dsl

from kubetune.components import evaluate, preflight, prepare_data, prepare_model, register, tokenize, train
from kubetune.config import default_config

PIPELINE_NAME = "kubetune"
COMPILED = Path(__file__).with_name("kubetune_pipeline.yaml")


@dsl.pipeline(name=PIPELINE_NAME,
              description="Fine-tune a language model: preflight, data, tokenize, model prep, train, "
                          "evaluate, register; one MLflow run per pipeline run.")
def kubetune_pipeline(config_json: str = json.dumps(default_config())) -> str:
    # The whole run config travels as one JSON string: KFP struct parameters cannot hold null,
    # and null is meaningful here (lora: null = no LoRA).
    config = config_json
    checked = preflight(config_json=config)
    run_id = checked.output
    data = prepare_data(config_json=config, run_id=run_id)
    tokens = tokenize(config_json=config, run_id=run_id, dataset=data.outputs["dataset"])
    prepared = prepare_model(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"])
    trained = train(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"],
                    prepared_model=prepared.outputs["prepared_model"])
    evaluated = evaluate(config_json=config, run_id=run_id, tokenized=tokens.outputs["tokenized"],
                         tuned_model=trained.outputs["tuned_model"])
    registered = register(config_json=config, run_id=run_id, tuned_model=trained.outputs["tuned_model"],
                          prepared_model=prepared.outputs["prepared_model"],
                          evaluation=evaluated.outputs["evaluation"])
    return registered.output


def compile_pipeline(path: Path = COMPILED) -> Path:
    compiler.Compiler().compile(kubetune_pipeline, package_path=str(path))
    return path
