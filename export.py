"""Export a checkpoint to ONNX, TorchScript or an ExportedProgram: ``python export.py --help``.

A thin entry point: the command lives in ``finetune/commands/export.py`` (also installed as
``finetune-export``).
"""

import sys

from finetune.commands.export import main
from finetune.errors import run_cli

if __name__ == "__main__":
    sys.exit(run_cli(main))
