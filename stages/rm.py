"""Stage 3, rm: a scalar reward model trained on ranked completions.

The SFT model gets a fresh one-output head (AutoModelForSequenceClassification) and
learns, prompt by prompt, to score better completions higher. TRL's RewardTrainer
runs the training; our collator and loss keep each prompt's K completions together
(one forward pass, the loss averaged over the prompt's pairs) as InstructGPT does.

A completion is scored exactly as the RLHF stage will see it: the chat-templated
prompt with the generation prompt, the completion's tokens, then EOS. The reward is
read at that EOS. The held-out reward mean and std go into the manifest, for the
RLHF stage to normalise rewards with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, SettingError, resolve_local, setting
from stages import data, preferences
from stages.sft import LoraSettings


@dataclass(frozen=True)
class RmData:
    train: str = setting("configs/data/demo_rm.jsonl", path="local-or-hub")
    """Rankings: .jsonl/.json/.parquet, or a Hub dataset `org/name[:split]`."""
    eval: str | None = setting(None, path="local-or-hub")
    """Held-out rankings; null holds out `eval_fraction` of the train prompts."""
    eval_fraction: float = 0.1
    drop_bad_rows: bool = False
    """Skip (and count) rows that break a rule, instead of stopping at the first."""

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise SettingError("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")


@dataclass(frozen=True)
class RmConfig:
    init_from: str | None = setting(None, path="local", fingerprint=False)
    """Start from this causal-LM folder instead of the run's SFT checkpoint."""
    data: RmData = RmData()
    method: Literal["full", "lora"] = "full"
    lora: LoraSettings = LoraSettings()
    epochs: float = 1.0
    max_steps: int = -1
    """When > 0, train exactly this many optimiser steps and ignore `epochs`."""
    batch_size: int = 4
    """Prompts (each with all its completions) per device per micro-step."""
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 512
    """Tokens per prompt + completion; a longer completion is cut, a prompt that fills it is a bad row."""
    margin: float = 0.0
    """Margin in the loss, -log sigmoid(r_better - r_worse - margin); a pair row's own "margin" wins."""
    center_rewards_coefficient: float = 0.0
    """Adds coef * mean(reward^2) to the loss to keep rewards near 0 (0.01 is common; 0 is off)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    activation_checkpointing: bool = setting(False, fingerprint=False)
    eval_batch_size: int = setting(8, fingerprint=False)
    """Prompts per forward pass when evaluating."""
    save_steps: int = setting(25, fingerprint=False)
    logging_steps: int = setting(5, fingerprint=False)
    report_to: tuple[str, ...] = setting(("none",), fingerprint=False)

    def __post_init__(self):
        for name in ("batch_size", "gradient_accumulation_steps", "max_length", "save_steps", "logging_steps", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise SettingError(name, f"must be at least 1, got {getattr(self, name)}")
        if self.max_steps <= 0 and self.epochs <= 0:
            raise SettingError("epochs", "must be positive when max_steps is not set")
        if self.learning_rate <= 0:
            raise SettingError("learning_rate", f"must be positive, got {self.learning_rate}")
        if self.center_rewards_coefficient < 0:
            raise SettingError("center_rewards_coefficient", "must be >= 0")

    def unused(self) -> set[str]:
        return {"lora"} if self.method == "full" else set()


def check(cfg: RmConfig) -> tuple[list, list | None, dict]:
    """Read every row before anything trains: (train, held-out or None, dropped counts)."""
    from stages import training

    training.check_loggers(cfg.report_to, "rm.report_to")
    if cfg.init_from is not None:
        folder = resolve_local(cfg.init_from, hub_allowed=False)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"rm.init_from: {cfg.init_from} is not a model folder (no config.json)")
    train, dropped = preferences.read_rankings(data.read_rows(cfg.data.train, "rm.data.train"), cfg.data.drop_bad_rows)
    held = None
    if cfg.data.eval is not None:
        held, dropped_eval = preferences.read_rankings(data.read_rows(cfg.data.eval, "rm.data.eval"), cfg.data.drop_bad_rows)
        for reason, n in dropped_eval.items():
            dropped[reason] = dropped.get(reason, 0) + n
    if not train:
        raise ConfigError(f"rm.data.train: {cfg.data.train}: no usable rows (dropped: {dropped})")
    return train, held, dropped


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    before, after = metrics["eval_before"], metrics["eval_after"]
    return f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['pairs']} pairs, {metrics['steps']} steps ({metrics['method']})"


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, ranking: preferences.Ranking, max_length: int, margin: float) -> dict:
    """Token ids of each completion as the policy would produce it: the templated
    prompt, the completion's own tokens, EOS. Raises BadRow if the prompt alone
    leaves no room for a completion."""
    prompt_ids = data.encode_prompt(tokenizer, ranking.prompt)
    room = max_length - len(prompt_ids) - 1
    if room < 1:
        raise preferences.BadRow(ranking.where, "prompt_too_long", f"the prompt is {len(prompt_ids)} tokens, which leaves no room for a completion in max_length={max_length}")
    sequences, cut = [], 0
    for completion in ranking.completions:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(ids) > room:  # cut, and no EOS: the text did not end here
            sequences.append(prompt_ids + ids[: room + 1])
            cut += 1
        else:
            sequences.append(prompt_ids + ids + [tokenizer.eos_token_id])
    pair_margin = ranking.margin if ranking.margin is not None else margin
    return {
        "input_ids": sequences,
        "better": [i for i, _ in ranking.pairs],
        "worse": [j for _, j in ranking.pairs],
        "margins": [pair_margin] * len(ranking.pairs),
        "cut": cut,
    }


def encode_all(tokenizer, rankings, cfg: RmConfig, dropped: dict) -> list[dict]:
    examples = []
    for ranking in rankings:
        try:
            examples.append(encode(tokenizer, ranking, cfg.max_length, cfg.margin))
        except preferences.BadRow as e:
            if not cfg.data.drop_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    return examples


class RankingCollator:
    """Flattens a batch of rankings into one right-padded batch of completions, with
    pair indices (`better`, `worse`), each pair's prompt (`group`) and `margins`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        sequences, better, worse, group, margins = [], [], [], [], []
        for g, example in enumerate(examples):
            offset = len(sequences)
            sequences += example["input_ids"]
            better += [offset + i for i in example["better"]]
            worse += [offset + j for j in example["worse"]]
            group += [g] * len(example["better"])
            margins += example["margins"]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention_mask[row, : len(seq)] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "better": torch.tensor(better),
            "worse": torch.tensor(worse),
            "group": torch.tensor(group),
            "margins": torch.tensor(margins, dtype=torch.float),
        }


# ---------------------------------------------------------------- training


def run(cfg: RmConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    from transformers import AutoTokenizer

    from stages import training

    train_rankings, held_rankings, dropped = check(cfg)
    if held_rankings is None:
        train_rankings, held_rankings = preferences.split_by_prompt(train_rankings, cfg.data.eval_fraction, seed, "rm.data.train")
    model_dir = inputs["sft"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None or tokenizer.pad_token_id == tokenizer.eos_token_id:
        raise ConfigError(f"{model_dir}: the tokenizer pads with EOS (or not at all); prepare the model with the base stage, which fixes this")
    train = encode_all(tokenizer, train_rankings, cfg, dropped)
    held = encode_all(tokenizer, held_rankings, cfg, dropped)
    if not train or not held:
        raise ConfigError(f"rm.data: no usable {'training' if not train else 'held-out'} rankings after dropping bad rows ({dropped})")
    if dropped:
        print(f"[rm] dropped bad rows: {dropped}", flush=True)

    trainer = build_trainer(cfg, model_dir, tokenizer, train, out_dir, seed)
    eval_before = _before_training(trainer, held, cfg, out_dir)
    resume = training.resume_point(out_dir)
    if resume:
        print(f"[rm] resuming from {resume}", flush=True)
    counter = training.CountSteps()
    trainer.add_callback(counter)
    trainer.train(resume_from_checkpoint=resume)
    eval_after = evaluate(trainer.model, held, cfg.eval_batch_size, tokenizer.pad_token_id)
    print(f"[rm] held-out accuracy {eval_before['accuracy']:.3f} -> {eval_after['accuracy']:.3f} ({eval_after['pairs']} pairs)", flush=True)

    final = trainer.model
    if trainer.is_world_process_zero():
        if cfg.method == "lora":
            final.save_pretrained(out_dir / "adapter")
            final = final.merge_and_unload()
        final.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        ckpt.write_json_atomic(out_dir / "eval.json", {"before": eval_before, "after": eval_after})
        training.write_log_history(out_dir, trainer.state.log_history)
    return {
        "method": cfg.method,
        "train_prompts": len(train),
        "train_pairs": sum(len(e["better"]) for e in train),
        "eval_prompts": len(held),
        "dropped_bad_rows": dropped,
        "cut_completions": sum(e["cut"] for e in train + held),
        "steps": trainer.state.global_step,
        "steps_last_attempt": counter.steps,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "eval_before": eval_before,
        "eval_after": eval_after,
        # the RLHF stage normalises scores with these: held-out completions score ~N(0, 1)
        "reward_mean": eval_after["reward_mean"],
        "reward_std": eval_after["reward_std"],
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def load_reward_model(model_dir: Path, tokenizer, seed: int):
    """The causal LM with a fresh scalar head; the head's init follows the run seed."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    return model


def build_trainer(cfg: RmConfig, model_dir: Path, tokenizer, train: list[dict], out_dir: Path, seed: int):
    from datasets import Dataset
    from trl import RewardConfig

    from stages import training
    from stages.rm_trainer import RankingRewardTrainer

    args = RewardConfig(
        output_dir=str(out_dir),
        seed=seed,
        data_seed=seed,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        max_length=None,  # we tokenise and cut ourselves
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        activation_checkpointing=cfg.activation_checkpointing,
        remove_unused_columns=False,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        logging_steps=cfg.logging_steps,
        report_to=list(cfg.report_to),
        dataloader_num_workers=0,
        use_cpu=training.cpu_only(),
        **training.mixed_precision(cfg.precision),
    )
    model = load_reward_model(model_dir, tokenizer, seed)
    peft = training.lora_config(cfg.lora, task_type="SEQ_CLS") if cfg.method == "lora" else None
    return RankingRewardTrainer(
        model=model,
        args=args,
        data_collator=RankingCollator(tokenizer.pad_token_id),
        train_dataset=Dataset.from_list([{k: v for k, v in e.items() if k != "cut"} for e in train]),
        processing_class=tokenizer,
        peft_config=peft,
        callbacks=[training.MarkCompleteCheckpoints()],
    )


# ---------------------------------------------------------------- evaluation


def evaluate(model, examples: list[dict], batch_size: int, pad_token_id: int) -> dict:
    """Held-out metrics; the prompts are shared among processes and the rewards gathered."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from stages import ranking

    state = PartialState()
    indexed = list(enumerate(examples))
    collate = RankingCollator(pad_token_id)
    was_training = model.training
    model.eval()
    scored = []
    with state.split_between_processes(indexed, apply_padding=True) as mine, torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = collate([e for _, e in chunk])
            rewards = model(input_ids=batch["input_ids"].to(model.device), attention_mask=batch["attention_mask"].to(model.device)).logits.squeeze(-1).float().cpu()
            offset = 0
            for index, example in chunk:
                k = len(example["input_ids"])
                scored.append((index, rewards[offset : offset + k].tolist()))
                offset += k
    model.train(was_training)
    by_index = dict(gather_object(scored)) if state.num_processes > 1 else dict(scored)
    rewards = [by_index[i] for i in range(len(examples))]
    pairs = [list(zip(e["better"], e["worse"], strict=True)) for e in examples]
    return ranking.ranking_metrics(rewards, pairs)


def _before_training(trainer, held: list[dict], cfg: RmConfig, out_dir: Path) -> dict:
    """The fresh head's held-out metrics, kept in the work folder so a resumed run
    reports the true starting point."""
    path = out_dir / "before_training.json"
    if path.exists():
        return json.loads(path.read_text())
    metrics = evaluate(trainer.model, held, cfg.eval_batch_size, trainer.processing_class.pad_token_id)
    if trainer.is_world_process_zero():
        ckpt.write_json_atomic(path, metrics)
    return metrics
