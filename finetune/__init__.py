"""finetune: transfer learning for image classifiers, from a laptop to a SLURM cluster.

    import finetune
    run = finetune.train(data="DATA", model="resnet18", weights="DEFAULT", epochs=5)
    clf = finetune.load_classifier(run.run_dir / "model.safetensors")
    clf.predict("photos/", top_k=3)
"""

from typing import Any

__version__ = "0.1.0"  # the one place: pyproject.toml reads it, every checkpoint records it

__all__ = ["TrainConfig", "TrainResult", "__version__", "load_classifier", "train"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import finetune` stays cheap (no torch) for the version and the commands' --help.
    if name == "load_classifier":
        from finetune.models.inference import load_classifier

        return load_classifier
    if name in ("train", "TrainConfig", "TrainResult"):
        from finetune import api

        return getattr(api, name)
    raise AttributeError(f"module 'finetune' has no attribute '{name}'")
