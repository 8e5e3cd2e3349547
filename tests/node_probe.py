"""In each launched process, get the demo dataset and the pretrained model as train.py does, and
record which process built or copied them.

    accelerate launch ... tests/node_probe.py OUT_DIR
"""

import os
import sys
from pathlib import Path

import skimage.data

from finetune.config import TrainConfig
from finetune.models import weights
from finetune.training import run
from finetune.utils.runtime import build_accelerator

out = Path(sys.argv[1])
rank = os.environ["RANK"]


def recorded(what, real):
    def call(*args, **kwargs):
        with open(out / f"{what}-rank{rank}", "a") as f:
            f.write("built\n")
        return real(*args, **kwargs)
    return call


skimage.data.lfw_subset = recorded("demo", skimage.data.lfw_subset)
weights._from_mirror = recorded("weights", weights._from_mirror)
accelerator = build_accelerator("no")
config = TrainConfig(image_size=32)
data = run.dataset_folder(accelerator, config)
run.build_model(accelerator, config, ["face", "not_face"])
accelerator.wait_for_everyone()
(out / f"done-rank{rank}").write_text(str(data))
accelerator.end_training()
