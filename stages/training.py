"""Pieces every training stage shares: precision, resumable checkpoints, sample
generations and training logs. Imported only inside stage `run` functions, since it
pulls in torch and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainerCallback

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError


def mixed_precision(choice: str) -> dict:
    """Trainer flags for a precision setting. "auto" means bf16 autocast on a GPU
    that supports it, and plain fp32 elsewhere (exact, and resumable bit for bit)."""
    if choice == "auto":
        choice = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return {"bf16": choice == "bf16", "fp16": choice == "fp16"}


def lora_config(lora, task_type: str):
    """peft's LoraConfig from our LoraSettings. For SEQ_CLS, peft also trains and
    saves the new scalar head in full."""
    from peft import LoraConfig

    modules = lora.target_modules if lora.target_modules == "all-linear" else [m.strip() for m in lora.target_modules.split(",")]
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules, task_type=task_type)


def check_loggers(names: tuple[str, ...], key: str) -> None:
    """Unknown or uninstalled loggers fail before training, not after the first stages ran."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK, get_available_reporting_integrations

    known = ("none", "all", *INTEGRATION_TO_CALLBACK)
    installed = get_available_reporting_integrations()
    for name in names:
        if name not in known:
            raise ConfigError(f"{key}: unknown logger {name!r} (known: {', '.join(known)})")
        if name not in ("none", "all") and name not in installed:
            raise ConfigError(f"{key}: {name!r} is not installed in this environment (pip install {name} into .venv)")


def cpu_only() -> bool:
    """No accelerator here: tell the Trainer, or several CPU processes (torchrun with
    gloo) each train alone instead of together."""
    return not torch.accelerator.is_available()


class MarkCompleteCheckpoints(TrainerCallback):
    """After the Trainer writes checkpoint-N, flush it and add a COMPLETE marker:
    resuming only ever starts from a checkpoint that was written whole."""

    def on_save(self, args, state, control, **kwargs):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()  # every rank has written its RNG state
        if state.is_world_process_zero:
            ckpt.mark_checkpoint_complete(Path(args.output_dir) / f"{ckpt.CHECKPOINT_PREFIX}{state.global_step}")
        return control


class CountSteps(TrainerCallback):
    """Optimiser steps taken by this process: after a resume, only the remaining ones."""

    def __init__(self):
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1
        return control


def resume_point(out_dir: Path) -> str | None:
    latest = ckpt.latest_checkpoint(out_dir)
    return str(latest) if latest else None


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy responses to chat prompts, decoded without special tokens."""
    was_training, side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    responses = []
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts[start : start + batch_size]]
            batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            out = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            new = out[:, batch["input_ids"].shape[1] :]
            responses += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return responses


def write_samples(out_dir: Path, rows: list[dict]) -> None:
    """samples.jsonl for programs and samples.md for people, side by side."""
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    lines = ["# Sample generations (greedy, held-out prompts)", ""]
    for i, row in enumerate(rows, start=1):
        lines.append(f"## {i}. {row['prompt']}")
        for key, value in row.items():
            if key != "prompt":
                lines += [f"**{key}:**", "", "> " + (value or "(empty)").replace("\n", "\n> "), ""]
    (out_dir / "samples.md").write_text("\n".join(lines), encoding="utf-8")


def write_log_history(out_dir: Path, history: list[dict]) -> None:
    with open(out_dir / "trainer_log.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in history)


def progress_bar(total: int, done: int, name: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=done, desc=name, disable=not enabled, dynamic_ncols=True)
