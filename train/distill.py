"""Distil MLP speculator heads from a frozen target.

    accelerate launch [--config_file recipes/accelerate/NAME.yaml] train/distill.py --config recipes/NAME.yaml [--key value ...]

Every recipe key can be overridden on the command line (train/config.py lists them all). Runs are resumable:
`--resume auto` (the default) continues from the latest complete checkpoint in --output_dir.
"""

from __future__ import annotations

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
    try:
        values = trainer.train()
        trainer.save_final(values)
        try:
            trainer.push(values)
        except HubError as err:
            print(f"error: {err}", file=sys.stderr)
            print(f"error: the trained heads, eval.json and checkpoints are intact in {cfg.output_dir}", file=sys.stderr)
            return 3
    finally:
        trainer.logger.finish()
        trainer.accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
