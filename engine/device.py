"""Where and in what precision training runs; shared by the Trainer stages and PPO."""

from __future__ import annotations

import torch


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
