"""Export a checkpoint to ONNX, TorchScript or an ExportedProgram: ``python export.py --help``.

A thin entry point: the command lives in ``finetune/commands/export.py`` (also installed as
``finetune-export``).
"""


from finetune.commands.export import main
from finetune.errors import leave, run_cli

if __name__ == "__main__":
    leave(run_cli(main))
