"""Audit a dataset for mislabeled images, duplicates and outliers: ``python audit.py --help``.

A thin entry point: the command lives in ``finetune/commands/audit.py`` (also installed as
``finetune-audit``).
"""


from finetune.commands.audit import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
