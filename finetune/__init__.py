"""finetune: transfer learning for image classifiers, from a laptop to a SLURM cluster."""

__version__ = "0.1.0"
