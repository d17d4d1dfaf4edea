"""The file MLflow executes to load a registered kubetune version (a model from code).

Registration logs it as the version's python_model, with the kubetune_serving package beside it
(code_paths: the version's code/kubetune_serving). This file imports that logged copy under a name
of its own, so the version runs the code it was registered with even in a process that has already
imported kubetune_serving (kubetune's own, or one that loaded a version registered by another
kubetune release); MLflow only puts code/ first on sys.path, which does not replace a module
already imported. Nothing else imports this file: it sets MLflow's model as it runs.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, Optional

import mlflow.models
import mlflow.pyfunc
import pandas as pd

PACKAGE = "kubetune_serving"


def _logged_package():
    """The kubetune_serving this file was logged with: code/kubetune_serving beside it in a logged
    model, the folder it sits in when run from a source tree."""
    here = Path(__file__).resolve().parent
    folder = here / "code" / PACKAGE if (here / "code" / PACKAGE).is_dir() else here
    name = f"{PACKAGE}_{hashlib.sha256(str(folder).encode()).hexdigest()[:12]}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        package = importlib.util.module_from_spec(spec)
        sys.modules[name] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{name}.model")


class MlflowServedModel(_logged_package().ServedModel, mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.load(context.artifacts)

    # A DataFrame hint: MLflow infers no signature from it (registration gives one) and stops
    # asking for type hints.
    def predict(self, context, model_input: pd.DataFrame, params: Optional[dict[str, Any]] = None) -> list[str]:
        return self.serve(model_input, params)


mlflow.models.set_model(MlflowServedModel())
