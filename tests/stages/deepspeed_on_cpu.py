"""`python -m pipeline` under DeepSpeed on CPU processes, for tests/stages/test_deepspeed.py,
run under `accelerate launch --config_file configs/accelerate/zero2.yaml` (or zero3.yaml).
Not a test itself.

DeepSpeed's CPU backend compiles a shared-memory all-reduce op (deepspeed_shm_comm) the first
time a process group starts in a new environment: 40 s alone on this machine, over a minute
beside the other test worker, on every fresh CI machine. Only its inference all-reduce uses the
op, which training never calls, so here it is marked incompatible and DeepSpeed keeps plain
torch.distributed (gloo) for everything, as it does wherever the op cannot build. Nothing else
changes."""

from __future__ import annotations

import os
import sys

import deepspeed.ops

from pipeline import cli
from tests.stages.fsdp_on_cpu import exit_after_checkpoint


def main() -> int:
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if os.environ.get("EXIT_AFTER_CHECKPOINT"):
        exit_after_checkpoint(int(os.environ["EXIT_AFTER_CHECKPOINT"]))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    cli.exit_process(main())
