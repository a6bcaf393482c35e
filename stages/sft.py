"""Stage 2, sft: supervised fine-tuning on prompt-response pairs, loss on the response only.

TRL's SFTTrainer does the training. Rows become conversational prompt-completion
pairs, so the chat template frames them exactly as at inference, and the loss mask
covers the completion (the response and its end-of-turn token) and nothing else.
With LoRA the output is still a plain merged model folder, the adapter kept beside
it in adapter/, so every later stage reads one kind of checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.config import ConfigError, SettingError, setting
from stages.shared import data
from stages.shared.settings import TrainerSettings, check_loggers, check_lora, check_model_folder


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
class SftConfig(TrainerSettings):
    """TrainerSettings (init_from: instead of the run's base checkpoint), plus:"""

    data: SftData = SftData()
    max_length: int = 512
    """Tokens per sequence; longer ones are cut, and a row whose prompt alone fills it is dropped (and counted)."""
    eval_steps: int = setting(0, fingerprint=False)
    """Steps between held-out evaluations during training; 0: only before and after."""
    num_samples: int = setting(4, fingerprint=False)
    """Held-out prompts answered before and after training, written to samples.md."""
    sample_max_new_tokens: int = setting(64, fingerprint=False)


def check(cfg: SftConfig) -> tuple[list[dict], list[dict] | None]:
    """Read and validate every row before anything trains; returns (train, eval or None)."""
    check_loggers(cfg.report_to, "sft.report_to")
    check_lora(cfg, "sft.lora")
    check_model_folder(cfg.init_from, "sft.init_from", "causal")
    train = [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.train, "sft.data.train")]
    held = None
    if cfg.data.eval is not None:
        held = [data.sft_example(where, row) for where, row in data.read_rows(cfg.data.eval, "sft.data.eval")]
    else:
        data.rows_left_to_train(len(train), cfg.data.eval_fraction, "sft.data.train")
    return train, held


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    return (
        f"eval loss {metrics['eval_loss_before']:.3f} -> {metrics['eval_loss_after']:.3f}, "
        f"{metrics['steps']} steps ({metrics['method']})"
    )


def run(cfg: SftConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    from stages.shared import training

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

    def measure() -> dict:
        before = {"eval_loss": training.evaluate_before_training(trainer)["eval_loss"], "samples": []}
        if trainer.is_world_process_zero():
            before["samples"] = training.greedy_answers(trainer.model, tokenizer, sample_prompts, cfg.sample_max_new_tokens)
        return before

    before = training.before_training(trainer, out_dir, measure)
    steps_this_attempt = training.train(trainer, "sft", out_dir)
    eval_after = trainer.evaluate()["eval_loss"]

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        final = training.save_model(trainer.model, tokenizer, out_dir, lora=cfg.method == "lora")
        after = training.greedy_answers(final, tokenizer, sample_prompts, cfg.sample_max_new_tokens)
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
        "steps_last_attempt": steps_this_attempt,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "eval_loss_before": before["eval_loss"],
        "eval_loss_after": eval_after,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "trainable_parameters": trainable,
        "precision": training.precision_used(trainer),
        "fallbacks": training.dropped_sharding(trainer, "sft"),
    }


def build_trainer(cfg: SftConfig, model_dir: Path, train_rows: list[dict], eval_rows: list[dict], out_dir: Path, seed: int):
    """TRL's SFTTrainer over prompt-completion rows, checkpointing into `out_dir`."""
    import jinja2
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from stages.shared import training

    tokenizer = training.load_tokenizer(model_dir)
    args = SFTConfig(
        **training.trainer_arguments(cfg, out_dir, seed),
        per_device_eval_batch_size=cfg.batch_size,
        max_length=cfg.max_length,
        eval_strategy="steps" if cfg.eval_steps > 0 else "no",
        eval_steps=cfg.eval_steps or None,
    )
    # After the arguments: under ZeRO-3 they tell from_pretrained to load each process's
    # partition only (zero3_init_flag), so a model larger than one process's memory loads.
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    try:  # TRL renders every row with the chat template here
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_list(train_rows),
            eval_dataset=Dataset.from_list(eval_rows),
            processing_class=tokenizer,
            peft_config=cfg.lora.peft_config("CAUSAL_LM", model=model, key="sft.lora") if cfg.method == "lora" else None,
            callbacks=[training.MarkCompleteCheckpoints()],
        )
    except jinja2.TemplateError as e:
        raise ConfigError(
            f"sft: the chat template of {model_dir} cannot render the training rows ({str(e).strip().splitlines()[0]}); "
            "give base.chat_template one that renders user and assistant turns"
        ) from None
