"""Classify new images with a checkpoint: ``python predict.py --help``.

A thin entry point: the command lives in ``finetune/commands/predict.py`` (also installed as
``finetune-predict``).
"""

import sys

from finetune.commands.predict import main
from finetune.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
