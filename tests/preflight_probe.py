"""Run train.py's preflight in each launched process; write what each read and received.

    accelerate launch ... tests/preflight_probe.py OUT_DIR DATA POLICY
"""

import json
import os
import sys
from pathlib import Path

from finetune.data import preflight
from finetune.data.labelfiles import Columns
from finetune.errors import UserError
from finetune.training import run
from finetune.utils.runtime import build_accelerator

out, data, policy = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
read = []
real = preflight._check_file
preflight._check_file = lambda path, full: read.append(str(path)) or real(path, full)
accelerator = build_accelerator("no")
try:
    exclude, notes = run.preflight(accelerator, data, policy, Columns())
    result = {"exclude": sorted(exclude), "notes": notes}
except UserError as err:
    result = {"error": str(err)}
rank = int(os.environ.get("RANK", "0"))
(out / f"rank{rank}.json").write_text(json.dumps({"read": len(read), **result}))
# Both processes end the group together: rank 0 holds the store, and leaving it behind a live
# peer aborts with "terminate called without an active exception".
accelerator.wait_for_everyone()
accelerator.end_training()
