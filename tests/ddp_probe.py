"""Run train.main in each launched process, then save that process's weights for comparison.

    accelerate launch ... tests/ddp_probe.py OUT_DIR [train.py flags]
"""

import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from finetune.commands import train

out = Path(sys.argv[1])
result = train.main(sys.argv[2:])
rank = int(os.environ.get("RANK", "0"))
state = {k: v.detach().cpu().contiguous().clone() for k, v in result.model.state_dict().items()}
save_file(state, str(out / f"weights-rank{rank}.safetensors"))
