"""One thin KFP component per pipeline stage; the work is done by kubetune.stages."""

from kubetune.components.evaluate import evaluate
from kubetune.components.finish_run import finish_run
from kubetune.components.prepare_data import prepare_data
from kubetune.components.prepare_model import prepare_model
from kubetune.components.preflight import preflight
from kubetune.components.register import register
from kubetune.components.tokenize import tokenize
from kubetune.components.train import train

__all__ = ["preflight", "prepare_data", "tokenize", "prepare_model", "train", "evaluate", "register", "finish_run"]
