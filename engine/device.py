"""Where and in what precision training runs; shared by the Trainer stages and PPO."""

from __future__ import annotations

import os

import torch

SHARDING_ASKED = {"FSDP": "ACCELERATE_USE_FSDP", "DEEPSPEED": "ACCELERATE_USE_DEEPSPEED"}


def mixed_precision(choice: str) -> str:
    """"bf16", "fp16" or "fp32" for a precision setting. "auto" means bf16 autocast on a
    GPU that supports it, and plain fp32 elsewhere (exact, and resumable bit for bit)."""
    if choice == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return choice


def cpu_only() -> bool:
    """No accelerator here: tell the Trainer (or accelerate), or several CPU processes
    (torchrun with gloo) each train alone instead of together."""
    return not torch.accelerator.is_available()


def asked_for(kind: str) -> bool:
    """Whether the launch (accelerate's environment variables) asked for FSDP or DEEPSPEED."""
    return os.environ.get(SHARDING_ASKED[kind], "false").lower() in ("1", "true")


def dropped_sharding(accelerator) -> list[str]:
    """The fallback, when a launch asked for FSDP or DeepSpeed (accelerate's environment
    variables) and `accelerator` runs without it: on CPU processes accelerate 1.15 keeps
    plain DDP for an FSDP launch and says nothing, and every process then holds the whole
    model. One line per sharding asked for and dropped."""
    running = accelerator.distributed_type.value
    asked = [kind for kind in SHARDING_ASKED if asked_for(kind) and running != kind]
    return [f"the launch asked for {kind} but accelerate runs {running} (on CPU processes it drops FSDP): each process holds the whole model" for kind in asked]
