"""Stage 2, sft: supervised fine-tuning on prompt-response pairs, loss on the response only.

TRL's SFTTrainer does the training. Rows become conversational prompt-completion
pairs, so the chat template frames them exactly as at inference, and the loss mask
covers the completion (the response and its end-of-turn token) and nothing else.
With LoRA the output is still a plain merged model folder, the adapter kept beside
it in adapter/, so every later stage reads one kind of checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, SettingError, resolve_local, setting
from stages import data


@dataclass(frozen=True)
class SftData:
    train: str = setting("configs/data/demo_sft.jsonl", path="local-or-hub")
    """Training pairs: .jsonl/.json/.parquet, or a Hub dataset `org/name[:split]`."""
    eval: str | None = setting(None, path="local-or-hub")
    """Held-out pairs; null carves `eval_fraction` of train off with the run seed."""
    eval_fraction: float = 0.1
    """Share of train held out when `eval` is null."""

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise SettingError("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 16
    """Rank of the low-rank update."""
    alpha: int = 32
    """Scale of the update (alpha / r)."""
    dropout: float = 0.05
    target_modules: str = "all-linear"
    """Which linear layers get adapters: "all-linear" or a comma-separated list of module names."""


@dataclass(frozen=True)
class SftConfig:
    init_from: str | None = setting(None, path="local", fingerprint=False)
    """Start from this model folder instead of the run's base checkpoint."""
    data: SftData = SftData()
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()
    """Used when method is lora."""
    epochs: float = 1.0
    max_steps: int = -1
    """When > 0, train exactly this many optimiser steps and ignore `epochs`."""
    batch_size: int = 8
    """Sequences per device per micro-step."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    """Tokens per sequence; longer ones are cut, and a row whose prompt alone fills it is dropped (and counted)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, fp32 otherwise."""
    activation_checkpointing: bool = setting(False, fingerprint=False)
    """Trade compute for activation memory; the result is the same."""
    save_steps: int = setting(25, fingerprint=False)
    """Steps between resumable checkpoints."""
    eval_steps: int = setting(0, fingerprint=False)
    """Steps between held-out evaluations during training; 0: only before and after."""
    logging_steps: int = setting(5, fingerprint=False)
    report_to: tuple[str, ...] = setting(("none",), fingerprint=False)
    """Trainer loggers: none, tensorboard, wandb, trackio, ..."""
    num_samples: int = setting(4, fingerprint=False)
    """Held-out prompts answered before and after training, written to samples.md."""
    sample_max_new_tokens: int = setting(64, fingerprint=False)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "save_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise SettingError("epochs", "must be positive when max_steps is not set")
        if self.learning_rate <= 0:
            raise SettingError("learning_rate", f"must be positive, got {self.learning_rate}")

    def unused(self) -> set[str]:
        """Settings that cannot matter for this config, left out of the fingerprint."""
        return {"lora"} if self.method == "full" else set()


def check(cfg: SftConfig) -> tuple[list[dict], list[dict] | None]:
    """Read and validate every row before anything trains; returns (train, eval or None)."""
    from stages import training

    training.check_loggers(cfg.report_to, "sft.report_to")
    if cfg.init_from is not None:
        folder = resolve_local(cfg.init_from, hub_allowed=False)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"sft.init_from: {cfg.init_from} is not a model folder (no config.json)")
    train = [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.train, "sft.data.train")]
    held = None
    if cfg.data.eval is not None:
        held = [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.eval, "sft.data.eval")]
    return train, held


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    return (
        f"eval loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f}, "
        f"{metrics['steps']} steps ({metrics['method']})"
    )


def run(cfg: SftConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    from stages import training

    train_rows, held_rows = check(cfg)
    train_rows, eval_rows = data.split_rows(train_rows, held_rows, cfg.data.eval_fraction, seed, "sft.data.train")
    trainer = build_trainer(cfg, inputs["base"], train_rows, eval_rows, out_dir, seed)
    tokenizer = trainer.processing_class
    dropped = len(train_rows) - len(trainer.train_dataset)
    if dropped:
        print(f"[sft] dropped {dropped} training row(s) whose prompt alone fills max_length={cfg.max_length}", flush=True)
    if len(trainer.train_dataset) == 0:
        raise ConfigError(f"sft.max_length: every training row's prompt fills {cfg.max_length} tokens; raise it")

    sample_rows = eval_rows[: cfg.num_samples]
    sample_prompts = [row["prompt"] for row in sample_rows]
    before = _before_training(trainer, tokenizer, sample_prompts, cfg, out_dir)
    resume = training.resume_point(out_dir)
    if resume:
        print(f"[sft] resuming from {resume}", flush=True)
    counter = training.CountSteps()
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=resume)
    eval_after = trainer.evaluate()["eval_loss"]

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    final = trainer.model
    if trainer.is_world_process_zero():
        if cfg.method == "lora":
            final.save_pretrained(out_dir / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        after = training.generate(final, tokenizer, sample_prompts, cfg.sample_max_new_tokens)
        training.write_samples(out_dir, [
            {"prompt": row["prompt"][-1]["content"], "reference": row["completion"][0]["content"], "before": b, "after": a}
            for row, b, a in zip(sample_rows, before["samples"], after, strict=True)
        ])
        training.write_log_history(out_dir, trainer.state.log_history)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "method": cfg.method,
        "train_rows": len(trainer.train_dataset),
        "eval_rows": len(eval_rows),
        "dropped_too_long": dropped,
        "steps": trainer.state.global_step,
        "steps_last_attempt": counter.steps,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": eval_after,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "trainable_parameters": trainable,
        "precision": "bf16" if trainer.args.bf16 else "fp16" if trainer.args.fp16 else "fp32",
    }


def build_trainer(cfg: SftConfig, model_dir: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path, seed: int):
    """TRL's SFTTrainer over prompt-completion rows, checkpointing into `out_dir`."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from stages import training

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"{model_dir}: the tokenizer pads with EOS (or not at all); prepare the model with the base stage, which fixes this")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    args = SFTConfig(
        output_dir=str(out_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # a float below 1 is a ratio of the total steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=cfg.max_length,
        activation_checkpointing=cfg.activation_checkpointing,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,  # the newest complete checkpoint survives a crash while writing the next
        eval_strategy="steps" if cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
        logging_steps=cfg.logging_steps,
        report_to=list(cfg.report_to),
        dataloader_num_workers=0,
        use_cpu=training.cpu_only(),
        **training.mixed_precision(cfg.precision),
    )
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train_rows),
        eval_dataset=Dataset.from_list(eval_rows),
        processing_class=tokenizer,
        peft_config=training.lora_config(cfg.lora, task_type="CAUSAL_LM") if cfg.method == "lora" else None,
        callbacks=[training.MarkCompleteCheckpoints()],
    )


def _before_training(trainer, tokenizer, prompts, cfg: SftConfig, out_dir: Path) -> dict:
    """Held-out loss and samples of the untrained model. Saved in the work folder, so
    a resumed run reports the true starting point rather than a checkpoint's."""
    from stages import training

    path = out_dir / "before_training.json"
    if path.exists():
        return json.loads(path.read_text())
    before = {"eval_loss": trainer.evaluate()["eval_loss"], "samples": []}
    if trainer.is_world_process_zero():
        before["samples"] = training.generate(trainer.model, tokenizer, prompts, cfg.sample_max_new_tokens)
        ckpt.write_json_atomic(path, before)  # a resume reads it back: never leave it torn
    return before
