"""`python -m pipeline` with FSDP allowed on CPU processes, for tests/stages/test_fsdp.py and
test_sharded_rlhf.py, run under `accelerate launch --config_file configs/accelerate/fsdp2.yaml`. Not a test itself.

accelerate 1.15 turns FSDP on only for accelerator process groups: a Trainer on CPU
(use_cpu, gloo) gets a MULTI_CPU state and the FSDP plugin is dropped without a word, so
the run is plain DDP (accelerate/state.py, AcceleratorState.__init__, where only the
MULTI_GPU/NPU/XPU/... types become FSDP). torch's fully_shard itself runs on CPU with gloo,
so this lifts that one gate: the rest (sharding, sharded checkpoints, the full state dict
gathered for the final folder) is accelerate's and torch's own code.

With fsdp_offload_params, accelerate builds torch's CPUOffloadPolicy() with its default
pin_memory=True, and pinning needs an accelerator ("Cannot access accelerator device when
none is available", torch/distributed/fsdp/_fully_shard/_fsdp_param.py, _init_sharded_param);
the config file has no key for it, so here the policy is the same one without pinning."""

from __future__ import annotations

import os
import sys

import torch
from accelerate import state
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import CPUOffloadPolicy

from pipeline import cli

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    wanted = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if wanted and self.distributed_type == DistributedType.MULTI_CPU and self.__dict__.get("fsdp_plugin") is None:
        plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()
        if isinstance(plugin.cpu_offload, CPUOffloadPolicy):
            plugin.cpu_offload = CPUOffloadPolicy(pin_memory=False)
        self.fsdp_plugin = plugin
        self.distributed_type = DistributedType.FSDP
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        if not _said:
            print("[fsdp_on_cpu] FSDP on CPU processes", flush=True)
            _said.append(True)


_said: list[bool] = []


def exit_after_checkpoint(step: int) -> None:
    """Every process ends at once (as if killed) once checkpoint-`step` is marked complete,
    in a Trainer stage or in rlhf (tests/stages/deepspeed_on_cpu.py calls it too)."""
    from engine import checkpointing
    from stages.shared import training

    on_save = training.MarkCompleteCheckpoints.on_save

    def on_save_then_exit(self, args, trainer_state, control, **kwargs):
        result = on_save(self, args, trainer_state, control, **kwargs)
        if trainer_state.global_step == step:
            torch.distributed.barrier()
            os._exit(9)
        return result

    training.MarkCompleteCheckpoints.on_save = on_save_then_exit
    save_checkpoint = checkpointing.save_checkpoint

    def save_checkpoint_then_exit(accelerator, out_dir, at_step):
        save_checkpoint(accelerator, out_dir, at_step)
        if at_step == step:
            torch.distributed.barrier()
            os._exit(9)

    checkpointing.save_checkpoint = save_checkpoint_then_exit


def main() -> int:
    state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    if os.environ.get("EXIT_AFTER_CHECKPOINT"):
        exit_after_checkpoint(int(os.environ["EXIT_AFTER_CHECKPOINT"]))
    return cli.main(sys.argv[1:])


if __name__ == "__main__":
    cli.exit_process(main())
