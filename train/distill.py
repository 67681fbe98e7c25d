"""Distil MLP speculator heads from a frozen target.

    accelerate launch [--config_file recipes/accelerate/NAME.yaml] train/distill.py --config recipes/NAME.yaml [--key value ...]

Every recipe key can be overridden on the command line (train/config.py lists them all). Runs are resumable:
`--resume auto` (the default) continues from the latest complete checkpoint in --output_dir.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    from speculators.hub import HubError
    from speculators.train.config import ConfigError, load_config

    try:
        cfg = load_config(sys.argv[1:] if argv is None else argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    from speculators.train.trainer import Trainer

    try:
        trainer = Trainer(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    code = 0
    try:
        values = trainer.train()
        trainer.save_final(values)
        try:
            trainer.push(values)
        except HubError as err:
            print(f"error: {err}", file=sys.stderr)
            print(f"error: the trained heads, eval.json and checkpoints are intact in {cfg.output_dir}", file=sys.stderr)
            code = 3
    except BaseException:
        trainer.logger.finish()
        trainer.accelerator.end_training()
        raise
    trainer.logger.finish()
    acc = trainer.accelerator
    if acc.num_processes > 1:
        # Every rank is done and every file is written. Leave without tearing the process group down: gloo's
        # worker threads can abort a process when the group or the interpreter is torn down around them
        # ("terminate called without an active exception", seen on CPU runs; pytorch/pytorch#179291).
        acc.wait_for_everyone()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    acc.end_training()
    return code


if __name__ == "__main__":
    sys.exit(main())
