"""Evaluate a checkpoint on labelled images: ``python eval.py --help``.

A thin entry point: the command lives in ``finetune/commands/eval.py`` (also installed as
``finetune-eval``).
"""


from finetune.commands.eval import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
