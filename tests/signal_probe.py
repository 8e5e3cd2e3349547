"""Run train.py's main with a signal sent at a chosen moment, from the main process (rank 0).

    [accelerate launch ...] tests/signal_probe.py WHEN SIGNAL TARGET [train.py flags]

WHEN: ``startup`` (while the model is built), ``step:N`` (after optimizer step N of the run),
``eval`` (at the first evaluation), ``save`` (at the first save of a state).
SIGNAL: a name such as SIGTERM. TARGET: ``self`` (this process), ``launcher`` (its parent) or
``group`` (its whole process group: the launcher, every process and the loader workers).
"""

import os
import signal
import sys

import finetune.training.loop as loop
import finetune.training.run
from finetune.commands import train
from finetune.errors import run_cli

when, sig, target = sys.argv[1], signal.Signals[sys.argv[2]], sys.argv[3]
fired = False


def fire() -> None:
    global fired
    if fired or int(os.environ.get("RANK", "0")) != 0:
        return
    fired = True
    print(f"probe: sending {sig.name} to {target} at {when}", file=sys.stderr, flush=True)
    if target == "group":
        os.killpg(0, sig)
    else:
        os.kill(os.getppid() if target == "launcher" else os.getpid(), sig)


def before(module, name: str, condition=lambda *args: True) -> None:
    """Fire just before ``module.name`` runs (when ``condition`` holds for its arguments)."""
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        if condition(*args):
            fire()
        return original(*args, **kwargs)
    setattr(module, name, wrapped)


if when == "startup":
    before(finetune.training.run, "build_classifier")  # the run calls it by this name
elif when.startswith("step:"):
    step = int(when.split(":")[1])
    original_after_step = loop.after_step

    def after_step(lp, epoch, batch):
        if loop.optimizer_step_done(lp, epoch, batch) == step:
            fire()
        original_after_step(lp, epoch, batch)
    loop.after_step = after_step
elif when == "eval":
    before(loop, "evaluate")
elif when == "save":
    before(loop, "save_training_state")
else:
    raise SystemExit(f"unknown moment {when}")

sys.exit(run_cli(train.main, sys.argv[4:]))
