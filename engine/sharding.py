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
training) they are gathered whole the same way. Once the engine exists (rlhf), its hooks
would gather and free each layer again inside every forward of sampling, collectively, so
processes whose answers end at different lengths would wait on each other forever: they are
taken off for the block, as TRL does for ZeRO-3 generation. Under DDP, ZeRO-1/2 or one
process every weight is whole already and nothing happens.
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


def weights_sharded(accelerator) -> bool:
    """Whether `accelerator` runs a sharding that splits the weights themselves across
    processes (FSDP, ZeRO-3, Megatron), not only gradients and optimiser state (ZeRO-1/2)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return accelerator.state.deepspeed_plugin.zero_stage == 3
    return kind in (DistributedType.FSDP, DistributedType.MEGATRON_LM)


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

        hooks = _zero3_hooks(accelerator)
        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):  # read-only: nothing written back
            if hooks is not None:
                hooks._remove_module_hooks()
            try:
                yield module
            finally:
                if hooks is not None:
                    hooks.forward_hooks, hooks.backward_hooks = [], []
                    hooks.setup_zero_stage3_hooks()
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
    (None on the others). Under FSDP2 a state dict is sharded even while the weights are
    gathered, so accelerate gathers it; under ZeRO-3 `whole` serves."""
    if units(module):
        state = accelerator.get_state_dict(module)  # every process takes part
    elif partitioned(module):
        with whole(accelerator, module):
            state = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()} if accelerator.is_main_process else None
    else:
        return module
    if not accelerator.is_main_process:
        return None
    with built_whole():
        copy = build()
    copy.load_state_dict(state)
    return copy


def _zero3_hooks(accelerator):
    """The ZeRO-3 engine's parameter hooks (DeepSpeed's `DeepSpeedZeRoOffload`), or None
    before the engine exists or without one."""
    engine = getattr(getattr(accelerator, "deepspeed_engine_wrapped", None), "engine", None)
    return getattr(getattr(engine, "optimizer", None), "parameter_offload", None)


@contextmanager
def built_whole():
    """Models built in the block are plain. While a ZeRO-3 config is registered (by the
    Trainer's arguments, or by accelerate for a launch with zero3_init_flag), transformers
    builds every model inside DeepSpeed's zero.Init, partitioned as it loads. That suits the
    model an engine will train, and no other: a frozen model no engine drives would never
    be gathered, and partitioning is collective, so on the main process alone it waits forever."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # transformers without its DeepSpeed integration: nothing registers one
        yield
        return
    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers offers no getter for the object itself
    registered = ref() if ref is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if registered:
            hf_deepspeed.set_hf_deepspeed_config(registered)
