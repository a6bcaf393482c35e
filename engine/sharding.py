"""The trained module's weights made whole for the calls that do not go through its own
forward under FSDP2: sampling (`generate` and the KV-cache loop call the causal LM
inside it), the layout probes, the LoRA reference (the policy with its adapters off)
and the held-out check; and a plain copy of it for the final save.

FSDP2 (`fully_shard`) shards each parameter in place, as a DTensor, and all-gathers a
unit's parameters in that unit's pre-forward hook. accelerate makes the trained module
(`PolicyAndValue`) the root unit and each decoder layer a unit of its own, so a call into
the causal LM inside the root finds the root's own parameters (embeddings, final norm,
output layer, value head) still sharded. Here every unit is all-gathered once and kept
gathered until the block ends: generation then runs on whole weights, as the DeepSpeed-
Chat hybrid engine and TRL's ZeRO-3 generation do, at the memory of one whole copy of
the trained module per process while it lasts. Under DeepSpeed ZeRO-3 (zero3_init_flag)
the weights are partitioned from the moment they load, and DeepSpeed gathers a layer for
its forward only once its engine exists: before that (the layout probes, the numbers before
training) they are gathered whole the same way. Under DDP, ZeRO-1/2 or one process every
weight is whole already and nothing happens.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from torch import nn


def units(module: nn.Module) -> list[nn.Module]:
    """The FSDP2 units in `module` (the root first), or [] when it is not sharded."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return []
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def partitioned(module: nn.Module) -> list[nn.Parameter]:
    """`module`'s parameters that DeepSpeed ZeRO-3 has partitioned, or []."""
    return [p for p in module.parameters() if hasattr(p, "ds_id")]


def sharded(module: nn.Module) -> bool:
    """Whether each process holds only part of `module`'s weights (FSDP2 or ZeRO-3)."""
    return bool(units(module) or partitioned(module))


@contextmanager
def whole(accelerator, module: nn.Module):
    """Every parameter of `module` gathered (all processes must enter together), and
    sharded again afterwards. The decoder-layer units get the run's reshard-after-forward
    setting back; the root keeps its parameters gathered between forward and backward,
    FSDP2's own choice for a root. `accelerator` is read only under FSDP2."""
    found = units(module)
    if not found:
        zero3 = partitioned(module)
        if not zero3:
            yield module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):  # read-only: nothing written back
            yield module
        return
    root = found[0]
    # FSDP2 makes whichever unit runs forward first the root; a decoder layer called
    # before the trained module's first forward would claim it. The root is settled
    # here, before anything inside it runs (FSDPModule has no public call for this).
    root._get_fsdp_state()._lazy_init()
    root.set_reshard_after_forward(False)  # recursive: no unit frees its gathered weights mid-block
    for unit in found:
        unit.unshard()
    try:
        yield module
    finally:
        reshard = bool(getattr(accelerator.state.fsdp_plugin, "reshard_after_forward", True))
        for unit in found[1:]:
            unit.set_reshard_after_forward(reshard, recurse=False)
        for unit in found:
            unit.reshard()


def plain_copy(accelerator, module: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """`module` with whole weights in a plain (unsharded) module, for saving: `module`
    itself when nothing is sharded; else `build()` (the same modules, freshly loaded)
    holding the full state dict gathered from every process, on the main process
    (None on the others). A state dict is always sharded under FSDP2, even while the
    weights are gathered, so `whole` cannot serve the save."""
    if not units(module):
        return module
    state = accelerator.get_state_dict(module)  # every process takes part
    if not accelerator.is_main_process:
        return None
    copy = build()
    copy.load_state_dict(state)
    return copy
