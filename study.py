"""Compare transfer strategies on one dataset: ``python study.py --help``.

A thin entry point: the command lives in ``finetune/commands/study.py`` (also installed as
``finetune-study``).
"""


from finetune.commands.study import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
