"""Stage 3, rm: a scalar reward model trained on ranked completions.

The SFT model gets a fresh one-output head (AutoModelForSequenceClassification) and
learns, prompt by prompt, to score better completions higher. TRL's RewardTrainer
runs the training; our collator and loss keep each prompt's K completions together
(one forward pass, the loss averaged over the prompt's pairs) as InstructGPT does.
The batch is packed as PPO packs its rollouts (engine.packing): no padding, and a
ranking's prompt computed once for its K completions, which attend to it.

A completion is scored exactly as the RLHF stage will see it: the chat-templated
prompt with the generation prompt, the completion's tokens, then EOS. The reward is
read at that EOS. The held-out reward mean and std go into the manifest, for the
RLHF stage to normalise rewards with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, SettingError, setting
from stages.shared import preferences
from stages.shared.judge import judged, load_judge, probe_judge
from stages.shared.settings import TrainerSettings, check_loggers, check_lora, check_model_folder


@dataclass(frozen=True)
class RmConfig(TrainerSettings):
    """TrainerSettings (init_from: a causal-LM folder instead of the run's SFT checkpoint), plus:"""

    data: preferences.PreferenceData = preferences.PreferenceData()
    batch_size: int = 4
    """Prompts (each with all its completions) per device per micro-step."""
    learning_rate: float = 1e-5
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_length: int = 512
    """Tokens per prompt + completion; a longer completion is cut, a prompt that fills it is a bad row."""
    max_prompt_length: int | None = None
    """A longer prompt keeps its last tokens (the end of a long dialogue says most about its last
    reply); null: prompts are never cut. Set it below max_length for long dialogues (HH-RLHF)."""
    margin: float = 0.0
    """Margin in the loss, -log sigmoid(r_better - r_worse - margin); a pair row's own "margin" wins."""
    center_rewards_coefficient: float = 0.0
    """Adds coef * mean(reward^2) to the loss to keep rewards near 0 (0.01 is common; 0 is off)."""
    eval_batch_size: int = setting(8, fingerprint=False)
    """Prompts per forward pass when evaluating."""
    eval_steps: int | None = setting(None, fingerprint=False)
    """Held-out accuracy every N steps too, for the learning curve (the manifest's `curve`,
    with the rankings seen); null: before and after training only."""
    criteria: str | None = setting(None, fingerprint=False)
    """A `module:function(prompt, completion) -> dict | None` naming what a rater checks (the demo's
    is demo.judge:gold_parts): held-out accuracy is also reported by the one criterion a pair's
    completions differ in. Measurement only; training never sees it."""

    def __post_init__(self):
        super().__post_init__()
        if self.eval_steps is not None and self.eval_steps < 1:
            raise SettingError("eval_steps", f"must be at least 1 or null, got {self.eval_steps}")
        if self.eval_batch_size < 1:
            raise SettingError("eval_batch_size", f"must be at least 1, got {self.eval_batch_size}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise SettingError("max_prompt_length", f"must be between 1 and max_length - 1 ({self.max_length - 1}), got {self.max_prompt_length}")
        if self.center_rewards_coefficient < 0:
            raise SettingError("center_rewards_coefficient", "must be >= 0")


def check(cfg: RmConfig) -> tuple[list, list | None, dict]:
    """Read every row before anything trains: (train, held-out or None, dropped counts)."""
    check_loggers(cfg.report_to, "rm.report_to")
    check_lora(cfg, "rm.lora")
    check_model_folder(cfg.init_from, "rm.init_from")
    train, held, dropped = preferences.read_data(cfg.data, "rm")
    probe_judge(cfg.criteria, "rm.criteria", [r.prompt[-1]["content"] for r in (held or train)], parts=True)
    return train, held, dropped


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    before, after = metrics["eval_before"], metrics["eval_after"]
    return f"held-out accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on {after['pairs']} pairs, {metrics['steps']} steps ({metrics['method']})"


# ---------------------------------------------------------------- tokenizing


def encode(tokenizer, ranking: preferences.Ranking, max_length: int, margin: float, max_prompt_length: int | None = None) -> dict:
    """Token ids of each completion as the policy would produce it: the templated
    prompt, the completion's own tokens, EOS. A prompt over `max_prompt_length` keeps
    its last tokens. Raises BadRow if the prompt leaves no room for a completion."""
    tokens = preferences.tokenize(tokenizer, ranking, max_length, max_prompt_length)
    sequences, cut, cut_prompt = [tokens.prompt + ids for ids in tokens.completions], tokens.cut, tokens.cut_prompt
    pair_margin = ranking.margin if ranking.margin is not None else margin
    return {
        "input_ids": sequences,
        "prompt_length": len(tokens.prompt),
        "better": [i for i, _ in ranking.pairs],
        "worse": [j for _, j in ranking.pairs],
        "margins": [pair_margin] * len(ranking.pairs),
        "cut": cut,
        "cut_prompt": int(cut_prompt),
    }


def encode_all(tokenizer, rankings, cfg: RmConfig, dropped: dict, criteria=None) -> list[dict]:
    """Every usable ranking encoded; with a `criteria` function (see RmConfig.criteria),
    each pair also gets its kind: the one criterion its completions differ in."""
    examples = []
    for ranking in rankings:
        try:
            example = encode(tokenizer, ranking, cfg.max_length, cfg.margin, cfg.max_prompt_length)
            if criteria is not None:
                text = ranking.prompt[-1]["content"]
                parts = [judged(criteria, cfg.criteria, "rm.criteria", text, completion, parts=True) for completion in ranking.completions]
                example["kinds"] = [pair_kind(parts[i], parts[j]) for i, j in ranking.pairs]
            examples.append(example)
        except preferences.BadRow as e:
            if not cfg.data.drop_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    return examples


def pair_kind(parts_better: dict | None, parts_worse: dict | None) -> str:
    """What a pair's two completions differ in, by a criteria function's parts: the one
    criterion's name, "several", "none", or "unrated" when either has no parts."""
    if parts_better is None or parts_worse is None:
        return "unrated"
    differ = sorted(key for key in parts_better if parts_better[key] != parts_worse.get(key))
    return differ[0] if len(differ) == 1 else "several" if differ else "none"


class RankingCollator:
    """Flattens a batch of rankings into one packed batch of completions (engine.packing
    with `layout`): `input_ids`, `position_ids`, the `attention_mask` a shared layout
    needs, `last` (each completion's last token in the flattened rows, where its reward
    is read), and pair indices `better`, `worse`, each pair's prompt `group`, `margins`.

    Padded, the demo's batches were a quarter padding and 41% repeated prompt tokens,
    HH-RLHF's 37% and 38%; packed, each ranking's prompt is laid out once per row and its
    K completions attend to it. Its keys and values are those each completion computes
    alone, and its gradient the sum of what each copy would collect, so the numbers are
    the padded batch's."""

    def __init__(self, tokenizer, layout):
        self.tokenizer = tokenizer
        self.layout = layout

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        from engine.packing import pack, pad_sequences

        prompts, completions, better, worse, group, margins = [], [], [], [], [], []
        for g, example in enumerate(examples):
            offset, n = len(completions), example["prompt_length"]
            prompts += [ids[:n] for ids in example["input_ids"]]
            completions += [ids[n:] for ids in example["input_ids"]]
            better += [offset + i for i in example["better"]]
            worse += [offset + j for j in example["worse"]]
            group += [g] * len(example["better"])
            margins += example["margins"]
        pad = self.tokenizer.pad_token_id
        queries, query_mask = pad_sequences(prompts, pad, "left")
        responses, response_mask = pad_sequences(completions, pad, "right")
        packed = pack(queries, query_mask, responses, response_mask, self.layout)
        batch = {
            "input_ids": packed.input_ids,
            "position_ids": packed.position_ids,
            "last": packed.last,
            "better": torch.tensor(better),
            "worse": torch.tensor(worse),
            "group": torch.tensor(group),
            "margins": torch.tensor(margins, dtype=torch.float),
        }
        if packed.attention_mask is not None:
            batch["attention_mask"] = packed.attention_mask
        return batch


# ---------------------------------------------------------------- training


def run(cfg: RmConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    from engine import probes, sharding
    from pipeline.fallbacks import Fallbacks
    from stages.shared import training

    train_rankings, held_rankings, dropped = check(cfg)
    if held_rankings is None:
        train_rankings, held_rankings = preferences.split_by_prompt(train_rankings, cfg.data.eval_fraction, seed, "rm.data.train")
    model_dir = inputs["sft"]
    tokenizer = training.load_tokenizer(model_dir)
    train = encode_all(tokenizer, train_rankings, cfg, dropped)
    held = encode_all(tokenizer, held_rankings, cfg, dropped, load_judge(cfg.criteria, "rm.criteria"))
    if not train or not held:
        raise ConfigError(f"rm.data: no usable {'training' if not train else 'held-out'} rankings after dropping bad rows ({dropped})")
    if dropped:
        print(f"[rm] dropped bad rows: {dropped}", flush=True)

    model = load_reward_model(model_dir, tokenizer, seed)
    fallbacks = Fallbacks("rm")
    with sharding.whole(None, model):  # the probes run the model: ZeRO-3 partitions it as it loads
        collate = RankingCollator(tokenizer, probes.layout_for(model, note=fallbacks))
    trainer = build_trainer(cfg, model, collate, train, out_dir, seed)
    eval_before = training.before_training(trainer, out_dir, lambda: evaluate(trainer.model, held, cfg.eval_batch_size, collate))
    if cfg.eval_steps:
        trainer.add_callback(training.HeldOutCurve(lambda model: evaluate(model, held, cfg.eval_batch_size, collate)["accuracy"], cfg.eval_steps, "heldout_accuracy"))
    steps_this_attempt = training.train(trainer, "rm", out_dir)
    eval_after = evaluate(trainer.model, held, cfg.eval_batch_size, collate)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * trainer.accelerator.num_processes
    points = [{"step": 0, "heldout_accuracy": eval_before["accuracy"]}] + training.curve(trainer.state.log_history, "heldout_accuracy")
    points.append({"step": trainer.state.global_step, "heldout_accuracy": eval_after["accuracy"]})
    print(f"[rm] held-out accuracy {eval_before['accuracy']:.3f} -> {eval_after['accuracy']:.3f} ({eval_after['pairs']} pairs)", flush=True)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        training.save_model(trainer.model, tokenizer, out_dir, lora=cfg.method == "lora")
        ckpt.write_json_atomic(out_dir / "eval.json", {"before": eval_before, "after": eval_after})
        training.write_log_history(out_dir, trainer.state.log_history)
    return {
        "method": cfg.method,
        "train_prompts": len(train),
        "train_pairs": sum(len(e["better"]) for e in train),
        "eval_prompts": len(held),
        "dropped_bad_rows": dropped,
        "cut_completions": sum(e["cut"] for e in train + held),
        "cut_prompts": sum(e["cut_prompt"] for e in train + held),
        "steps": trainer.state.global_step,
        "steps_last_attempt": steps_this_attempt,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "curve": [{**point, "rankings_seen": point["step"] * per_step} for point in points],
        # the RLHF stage normalises scores with these: held-out completions score ~N(0, 1)
        "reward_mean": eval_after["reward_mean"],
        "reward_std": eval_after["reward_std"],
        "trainable_parameters": trainable,
        "precision": training.precision_used(trainer),
        "layout": {"row_tokens": collate.layout.row_tokens, "share_prefix": collate.layout.share_prefix},
        "fallbacks": fallbacks.taken + training.dropped_sharding(trainer, "rm"),
    }


def load_reward_model(model_dir: Path, tokenizer, seed: int):
    """The causal LM with a fresh scalar head; the head's init follows the run seed."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    return model


def build_trainer(cfg: RmConfig, model, collate: RankingCollator, train: list[dict], out_dir: Path, seed: int):
    from datasets import Dataset
    from trl import RewardConfig

    from stages.rm_trainer import RankingRewardTrainer
    from stages.shared import training

    args = RewardConfig(
        **training.trainer_arguments(cfg, out_dir, seed),
        max_length=None,  # we tokenise and cut ourselves
        center_rewards_coefficient=cfg.center_rewards_coefficient or None,
        remove_unused_columns=False,
        eval_strategy="no",
    )
    return RankingRewardTrainer(
        model=model,
        args=args,
        data_collator=collate,
        train_dataset=Dataset.from_list([{k: v for k, v in e.items() if k not in ("cut", "cut_prompt")} for e in train]),
        processing_class=collate.tokenizer,
        peft_config=cfg.lora.peft_config("SEQ_CLS", model=model, key="rm.lora") if cfg.method == "lora" else None,
        callbacks=[training.MarkCompleteCheckpoints()],
    )


# ---------------------------------------------------------------- evaluation


def evaluate(model, examples: list[dict], batch_size: int, collate: RankingCollator) -> dict:
    """Held-out metrics; the prompts are shared among processes and the rewards gathered."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from engine.forward import packed_scores
    from stages import rm_ranking as ranking

    state = PartialState()
    indexed = list(enumerate(examples))
    was_training = model.training
    model.eval()
    scored = []
    with state.split_between_processes(indexed, apply_padding=True) as mine, torch.no_grad():
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            batch = collate([e for _, e in chunk])
            rewards = packed_scores(model, {k: v.to(model.device) for k, v in batch.items()}).float().cpu()
            offset = 0
            for index, example in chunk:
                k = len(example["input_ids"])
                scored.append((index, rewards[offset : offset + k].tolist()))
                offset += k
    model.train(was_training)
    by_index = dict(gather_object(scored)) if state.num_processes > 1 else dict(scored)
    rewards = [by_index[i] for i in range(len(examples))]
    pairs = [list(zip(e["better"], e["worse"], strict=True)) for e in examples]
    kinds = [e["kinds"] for e in examples] if all("kinds" in e for e in examples) else None
    return ranking.ranking_metrics(rewards, pairs, kinds)
