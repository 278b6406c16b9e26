"""`samba-lm train` with one fault injected after the checkpoint of step FAULT_AT_STEP, for the tests
that run it under torchrun (tests/test_train.py):

    FAULT=stop   every rank exits (status 3): a job that ended there, to be resumed by another
    FAULT=kill   rank 1 kills itself with SIGKILL, on the first attempt only (TORCHELASTIC_RESTART_COUNT 0),
                 so that torchrun's restart resumes the run

    torchrun --nproc_per_node 2 tests/train_with_fault.py train --data ... --out-dir ...
"""

import os
import signal
import sys

from samba_lm.cli import main
from samba_lm.train import trainer

AT_STEP, FAULT = int(os.environ["FAULT_AT_STEP"]), os.environ["FAULT"]
_save = trainer._save


def save_then_fail(out, step, *args, **kwargs):
    path = _save(out, step, *args, **kwargs)  # collective: every rank has passed its last barrier
    if step == AT_STEP and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
        if FAULT == "stop":
            os._exit(3)
        if FAULT == "kill" and os.environ.get("RANK") == "1":
            os.kill(os.getpid(), signal.SIGKILL)
    return path


if __name__ == "__main__":
    if FAULT not in ("stop", "kill"):
        raise SystemExit(f"FAULT must be stop or kill, got {FAULT!r}")
    trainer._save = save_then_fail
    main(sys.argv[1:])
