"""Entry point of one data-parallel training worker: `torchrun ... -m kubetune.distributed ARGS.json`.

kubetune.stages.train starts the workers; each runs the same training function and the Trainer
joins them into one DDP group from torchrun's environment (RANK, WORLD_SIZE, ...).
"""

import json
import sys


def main() -> None:
    from kubetune.stages import train_worker

    arguments = json.loads(open(sys.argv[1]).read())
    train_worker(arguments["config"], arguments["run_id"], arguments["tokenized_dir"], arguments["prepared_dir"],
                 arguments["out_dir"])


if __name__ == "__main__":
    main()
