"""What a launcher handed one process: its rank, the world it belongs to and the precision asked for.

    accelerate launch --config_file CONFIG tests/launch_probe.py OUT_DIR    # writes OUT_DIR/rankN.json
"""

import json
import os
import sys
from pathlib import Path

KEYS = ("RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "ACCELERATE_USE_CPU")
out = Path(sys.argv[1])
(out / f"rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps({k: os.environ.get(k) for k in KEYS}))
