"""Classify new images with a checkpoint: ``python predict.py --help``.

A thin entry point: the command lives in ``finetune/commands/predict.py`` (also installed as
``finetune-predict``).
"""


from finetune.commands.predict import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
