"""One node of a multi-node TrainJob: `python -m kubetune.train_node ARGS_JSON` is the command
kubetune.nodes gives Kubeflow Trainer; each node's pod runs it, and it runs torchrun over the node's
processes (kubetune.distributed.launch_node), which finds the other nodes through the PET_* variables.
"""

import json
import sys

from kubetune import stages


def main() -> None:
    stages.train_node(**json.loads(sys.argv[1]))


if __name__ == "__main__":
    main()
