"""MLflow's models: logging a model into a run, registering it, its versions' tags and aliases,
downloading a logged model, and the name rules of the registry.

kubetune.registry decides what a version holds and when it becomes the champion; this module only
says it to MLflow. So the registry's rules are tested on plain data (tests/unit/test_registry.py),
and everything MLflow-shaped (signatures, the fluent run, the client, its exceptions) stays here and
in kubetune.tracking (runs).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

from kubetune import tracking
from kubetune.errors import ConfigError, ModelError, ServiceError

log = logging.getLogger(__name__)

#: A column of chat messages: a list of {role, content} objects (signature type name).
MESSAGES = "messages"


def check_model_name(name: str) -> None:
    """register.model_name by MLflow's own rules for a registered model's name, those of its file
    store (the strictest: it adds no path separators and no '%' to the rules every store applies), so
    a name MLflow would refuse fails in preflight, not in register after training."""
    from mlflow.exceptions import MlflowException
    from mlflow.store.model_registry.file_store import _validate_model_name

    try:
        _validate_model_name(name)
    except MlflowException as exc:
        raise ConfigError("register.model_name", name, f"MLflow refuses it ({exc.message}); use letters, digits, "
                          "'-', '_' and '.', e.g. quotes-lora") from None


def signature(inputs: list[tuple[str, str, bool]], params: list[tuple[str, str, Any]]):
    """An MLflow ModelSignature from plain specs: inputs (column, type, required) where type is an
    MLflow column type ("string") or MESSAGES; params (name, type, default); one string out per row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array, Object, Property

    message = Object([Property("role", "string"), Property("content", "string")])
    columns = [ColSpec(Array(message) if kind == MESSAGES else kind, name, required=required)
               for name, kind, required in inputs]
    return ModelSignature(inputs=Schema(columns), outputs=Schema([ColSpec("string")]),
                          params=ParamSchema([ParamSpec(*param) for param in params]) if params else None)


def log_code_model(uri: str, run_id: str, model_name: str, *, code_file: Path, code_paths: list[Path],
                   artifacts: dict[str, str], signature, input_example, requirements: list[str]) -> tuple[str, str]:
    """Logs a model from code (code_file sets the model; code_paths travel with it) into the run and
    registers it as a new version of model_name; returns (version, model URI).

    MLflow checks the input example by loading the logged model and predicting it once
    (pyfunc.log_model has no switch to skip it); a failed check is logged as a warning, not raised."""
    import mlflow
    import mlflow.pyfunc

    with tracking.process_uris(uri), mlflow.start_run(run_id=run_id, log_system_metrics=False):
        info = mlflow.pyfunc.log_model(name="model", python_model=str(code_file),
                                       code_paths=[str(path) for path in code_paths], artifacts=artifacts,
                                       signature=signature, input_example=input_example,
                                       pip_requirements=requirements, registered_model_name=model_name,
                                       await_registration_for=60)
    return str(info.registered_model_version), info.model_uri


def log_transformers_model(uri: str, run_name: str, tags: dict[str, str], pipeline, task: str, example: str,
                           model_name: str, requirements: list[str]) -> tuple[str, str]:
    """Logs a transformers pipeline with MLflow's transformers flavor into a new run and registers it;
    returns (version, run id)."""
    import mlflow
    import mlflow.transformers

    with tracking.process_uris(uri), mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags(tags)
        info = mlflow.transformers.log_model(transformers_model=pipeline, task=task, name="model",
                                             input_example=[example], registered_model_name=model_name,
                                             pip_requirements=requirements, await_registration_for=60)
    return str(info.registered_model_version), run.info.run_id


def download(uri: str, model_uri: str, dest: Path, field: str, reference: str) -> Path:
    """A logged or registered model (models:/ or runs:/ URI) downloaded into dest; ModelError when
    the store has no such model, ServiceError when it cannot be read (field and reference name it)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        with tracking.process_uris(uri):  # models:/ URIs resolve through the process's registry URI
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    except MlflowException as exc:
        raise ModelError(field, reference, f"no such model in {uri} ({str(exc).splitlines()[0][:200]}); "
                                           "list versions in the MLflow UI or with the registry API") from None
    except OSError as exc:
        raise ServiceError(field, reference, f"could not download it from {uri}: {exc}") from None


class ModelStore:
    """A registered model's versions in one MLflow store: their tags and aliases. kubetune.registry
    takes anything with these methods, so its promotion rule is tested with a dict-backed stand-in."""

    def __init__(self, uri: str):
        self.client = tracking.client(uri)

    def tag_version(self, name: str, version: str, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, value)

    def version_tags(self, name: str, version: str) -> dict[str, str]:
        return dict(self.client.get_model_version(name, version).tags)

    def aliased(self, name: str, alias: str) -> Optional[tuple[str, dict[str, str]]]:
        """(version, its tags) of the version the alias points at, or None when there is none."""
        from mlflow.exceptions import MlflowException

        try:
            version = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:  # the registry raises when the alias (or the model) does not exist
            return None
        return str(version.version), dict(version.tags)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def describe_model(self, name: str, text: str) -> None:
        self.client.update_registered_model(name, description=text)

    def describe_version(self, name: str, version: str, text: str) -> None:
        self.client.update_model_version(name, version, description=text)
