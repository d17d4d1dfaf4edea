"""One data-parallel training worker: `torchrun ... -m kubetune.train_worker ARGS.json`.

kubetune.stages.train starts the workers through kubetune.distributed when train.processes > 1;
each runs the stage's training step (stages.train_worker) in its own process.
"""

from kubetune import stages
from kubetune.distributed import read_arguments


def main() -> None:
    stages.train_worker(**read_arguments())


if __name__ == "__main__":
    main()
