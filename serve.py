"""Serve a checkpoint over HTTP (an API and a page to drop images on): ``python serve.py --help``.

A thin entry point: the command lives in ``finetune/commands/serve.py`` (also installed as
``finetune-serve``).
"""


from finetune.commands.serve import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
