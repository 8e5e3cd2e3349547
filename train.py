"""Fine-tune a pretrained classifier on an ImageFolder: ``python train.py --help``.

A thin entry point: the command lives in ``finetune/commands/train.py`` (also installed as
``finetune-train``).
"""


from finetune.commands.train import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
