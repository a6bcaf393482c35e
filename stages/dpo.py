"""Optional stage dpo: Direct Preference Optimization of the SFT policy on the reward
model's preference rows, with TRL's DPOTrainer; no reward model, no sampling.

Data. The same rows as `rm` (K-wise rankings, scored completions, chosen/rejected
pairs, HH dialogues), read and split by prompt the same way, so with the same seed
and file both stages hold out the same prompts. A row's "margin" is ignored: TRL's
DPO losses have none.

Pairs, their order and their weight. DPO's loss is defined on pairs, so a ranking
becomes one training row per (better, worse) pair it yields
(`preferences.ranked_pairs`: every pair whose scores differ). A ranking's rows stay
together, as rm keeps a prompt's completions together (InstructGPT's reason: a
prompt's pairs scattered across an epoch put each completion into several separate
updates, and overfit). The training order (`RankingOrder`, the Trainer's train
sampler) shuffles the rankings, seeded by the run seed and the epoch (a new order each
epoch; the same on every process and after a resume), and gives each ranking's pairs
one after another, so they share a batch. A ranking may straddle a batch boundary (one
with more pairs than a batch holds always does): the rest of its pairs then open the
next batch, which may be the next optimiser step (or, with gradient accumulation or
several processes, another share of the same step). Batches are not packed with whole
rankings: the Trainer and accelerate want batches of one size. Each pair has equal
weight, which is what TRL users get when they expand rankings into pairs: TRL's loss
is a plain mean over a batch's rows, with no per-row weight, so a weight per prompt
(rm's InstructGPT choice) would mean replacing TRL's loss. The cost: a K=4 ranking
counts six times as much as one chosen/rejected row.

Tokens. A completion is what the policy generates: the chat-templated prompt with
the generation prompt (engine.chat.encode_prompt, as rm and rlhf), the completion's
own tokens, then EOS; the loss and the log-probs cover the completion and its EOS.
These are exactly rm's tokens; TRL's own conversational format would append what
the template writes after EOS (a newline for ChatML), which the policy never emits.

The reference. TRL 1.16's DPOTrainer runs the reference forward pass for every loss
type (it has no `reference_free` switch any more; only `sft` then ignores the numbers,
and the reference-free SimPO and CPO live in trl.experimental.cpo), so there is
always one. With `method: full` it is a frozen second copy of the SFT model. With
`method: lora` it is the same weights with the adapter switched off (TRL does this
when given no ref_model and a fresh adapter), so no second model is held.

Metrics. The held-out implicit reward of a completion is beta * (log pi(y|x) -
log pi_ref(y|x)); a pair is right when the chosen one's is higher. Before training
the policy is the reference, so every pair is an exact tie: ties count as wrong in
`accuracy` and are reported on their own (`ties`), so "before" reads 0 accuracy and
1.0 ties rather than a flattering 0.5.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError, SettingError, setting
from stages.shared import preferences
from stages.shared.settings import TrainerSettings, check_loggers, check_lora, check_model_folder

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
              "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
"""The loss types TRL 1.16's DPOConfig accepts (tests/stages/test_dpo.py checks this list against it)."""
SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")
"""The loss types that read label_smoothing."""


@dataclass(frozen=True)
class DpoConfig(TrainerSettings):
    """TrainerSettings (init_from: a causal-LM folder instead of the run's SFT checkpoint), plus
    the settings below. TRL turns every dropout layer off (policy, reference and LoRA's), so
    that the policy starts exactly at the reference: lora.dropout has no effect here."""

    data: preferences.PreferenceData = preferences.PreferenceData()
    batch_size: int = 8
    """Pairs per device per micro-step."""
    learning_rate: float = 5e-6
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = 0.1
    max_length: int = 512
    """Tokens per prompt + completion; a longer completion is cut (and loses its EOS), a prompt that fills it is a bad row."""
    max_prompt_length: int | None = None
    """A longer prompt keeps its last tokens; null: prompts are never cut."""
    beta: float = 0.1
    """Strength of the pull towards the reference (higher: stay closer); IPO's tau."""
    loss_type: str = "sigmoid"
    """One of TRL 1.16's DPO losses: sigmoid (DPO), ipo, hinge, robust, ... (see LOSS_TYPES)."""
    label_smoothing: float = 0.0
    """Probability that a label is flipped, for robust, exo_pair (needs > 0; EXO suggests 1e-3), aot, aot_unpaired."""
    eval_batch_size: int = setting(8, fingerprint=False)
    """Pairs per forward pass when measuring held-out accuracy."""

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise SettingError("loss_type", f"unknown loss type {self.loss_type!r} (TRL 1.16 DPO accepts: {', '.join(LOSS_TYPES)})")
        if not self.beta > 0:
            raise SettingError("beta", f"must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise SettingError("label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise SettingError("loss_type", "exo_pair needs label_smoothing above 0 (the EXO paper suggests 1e-3)")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise SettingError("max_prompt_length", f"must be between 1 and max_length - 1 ({self.max_length - 1}), got {self.max_prompt_length}")
        if self.eval_batch_size < 1:
            raise SettingError("eval_batch_size", f"must be at least 1, got {self.eval_batch_size}")

    def unused(self) -> set[str]:
        return super().unused() | (set() if self.loss_type in SMOOTHED else {"label_smoothing"})


def check(cfg: DpoConfig) -> tuple[list, list | None, dict]:
    """Read every row before anything trains: (train, held-out or None, dropped counts)."""
    check_loggers(cfg.report_to, "dpo.report_to")
    check_lora(cfg, "dpo.lora")
    check_model_folder(cfg.init_from, "dpo.init_from", "causal")
    return preferences.read_data(cfg.data, "dpo")


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    before, after = metrics["eval_before"], metrics["eval_after"]
    return (f"held-out implicit-reward accuracy {before['accuracy']:.3f} (ties {before['ties']:.3f}) -> {after['accuracy']:.3f} "
            f"on {after['pairs']} pairs, {metrics['steps']} steps ({metrics['method']}, {metrics['loss_type']}, beta {metrics['beta']:g})")


# ---------------------------------------------------------------- pairs


def encode(tokenizer, ranking: preferences.Ranking, max_length: int, max_prompt_length: int | None = None) -> dict:
    """A ranking's training rows, one per (better, worse) pair it yields, each as TRL's
    tokenised preference row: {"prompt_ids", "chosen_ids", "rejected_ids"}. The tokens
    are rm.encode's: the templated prompt (its last `max_prompt_length` tokens when
    longer), the completion's own tokens, EOS; a completion over max_length is cut and
    keeps no EOS. Raises BadRow if the prompt leaves no room for a completion."""
    tokens = preferences.tokenize(tokenizer, ranking, max_length, max_prompt_length)
    prompt_ids, completions, cut, cut_prompt = tokens.prompt, tokens.completions, tokens.cut, tokens.cut_prompt
    rows = [{"prompt_ids": prompt_ids, "chosen_ids": completions[i], "rejected_ids": completions[j]} for i, j in ranking.pairs]
    return {"rows": rows, "cut": cut, "cut_prompt": int(cut_prompt)}


def encode_all(tokenizer, rankings, cfg: DpoConfig, dropped: dict) -> list[dict]:
    """Every usable ranking encoded (see `encode`); with drop_bad_rows, a ranking whose
    prompt is too long is counted in `dropped` instead of stopping the run."""
    encoded = []
    for ranking in rankings:
        try:
            encoded.append(encode(tokenizer, ranking, cfg.max_length, cfg.max_prompt_length))
        except preferences.BadRow as e:
            if not cfg.data.drop_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    return encoded


class RankingOrder:
    """The order in which the Trainer reads the training pairs: the rankings shuffled,
    each ranking's pairs one after another. The dataset holds the rankings' pairs in
    a row (`sizes[r]` pairs for ranking r). An epoch's order is a function of the seed
    and the epoch alone (`set_epoch`), so every process computes the same one and a
    resumed run the same one again; every pair appears once per epoch."""

    def __init__(self, sizes: list[int], seed: int):
        if not sizes or min(sizes) < 1:
            raise ValueError(f"every ranking needs at least one pair, got sizes {sizes[:10]}")
        self.sizes = list(sizes)
        self.starts = [0, *itertools.accumulate(self.sizes)][:-1]
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self, epoch: int) -> list[int]:
        rankings = list(range(len(self.sizes)))
        random.Random(f"dpo rankings, seed {self.seed}, epoch {epoch}").shuffle(rankings)  # a str seed is hashed with sha512: the same in every process
        return [i for r in rankings for i in range(self.starts[r], self.starts[r] + self.sizes[r])]

    def __iter__(self):
        return iter(self.order(self.epoch))

    def __len__(self) -> int:
        return sum(self.sizes)


# ---------------------------------------------------------------- training


def run(cfg: DpoConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    from stages.shared import training

    train_rankings, held_rankings, dropped = check(cfg)
    if held_rankings is None:
        train_rankings, held_rankings = preferences.split_by_prompt(train_rankings, cfg.data.eval_fraction, seed, "dpo.data.train")
    model_dir = inputs["sft"]
    tokenizer = training.load_tokenizer(model_dir)
    train, held = encode_all(tokenizer, train_rankings, cfg, dropped), encode_all(tokenizer, held_rankings, cfg, dropped)
    if not train or not held:
        raise ConfigError(f"dpo.data: no usable {'training' if not train else 'held-out'} rows after dropping bad rows ({dropped})")
    if dropped:
        print(f"[dpo] dropped bad rows: {dropped}", flush=True)
    train_rows = [row for e in train for row in e["rows"]]
    held_rows = [row for e in held for row in e["rows"]]

    trainer = build_trainer(cfg, model_dir, tokenizer, [e["rows"] for e in train], out_dir, seed)
    start = training.before_training(trainer, out_dir, lambda: held_out_logps(trainer, held_rows, cfg.eval_batch_size))
    steps_this_attempt = training.train(trainer, "dpo", out_dir)
    end = held_out_logps(trainer, held_rows, cfg.eval_batch_size)
    eval_before = implicit_reward_metrics(start["policy_chosen"], start["policy_rejected"], start["ref_chosen"], start["ref_rejected"], cfg.beta)
    eval_after = implicit_reward_metrics(end["policy_chosen"], end["policy_rejected"], start["ref_chosen"], start["ref_rejected"], cfg.beta)
    drift = max(abs(a - b) for key in ("ref_chosen", "ref_rejected") for a, b in zip(start[key], end[key], strict=True))
    print(f"[dpo] held-out implicit-reward accuracy {eval_before['accuracy']:.3f} (ties {eval_before['ties']:.3f}) -> {eval_after['accuracy']:.3f} ({eval_after['pairs']} pairs)", flush=True)

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    if trainer.is_world_process_zero():
        training.save_model(trainer.model, tokenizer, out_dir, lora=cfg.method == "lora")
        ckpt.write_json_atomic(out_dir / "eval.json", {"before": eval_before, "after": eval_after})
        training.write_log_history(out_dir, trainer.state.log_history)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {
        "method": cfg.method,
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "train_prompts": len(train),
        "train_pairs": len(train_rows),
        "eval_prompts": len(held),
        "eval_pairs": len(held_rows),
        "dropped_bad_rows": dropped,
        "cut_completions": sum(e["cut"] for e in train + held),
        "cut_prompts": sum(e["cut_prompt"] for e in train + held),
        "steps": trainer.state.global_step,
        "steps_last_attempt": steps_this_attempt,
        "epochs": round(trainer.state.epoch or 0.0, 3),
        "eval_before": eval_before,
        "eval_after": eval_after,
        "reference_drift": drift,
        "train_loss_first": losses[0] if losses else None,
        "train_loss_last": losses[-1] if losses else None,
        "trainable_parameters": trainable,
        "precision": training.precision_used(trainer),
        "fallbacks": training.dropped_sharding(trainer, "dpo"),
    }


def build_trainer(cfg: DpoConfig, model_dir: Path, tokenizer, train: list[list[dict]], out_dir: Path, seed: int):
    """TRL's DPOTrainer on our tokenised pairs (`train`: each ranking's pair rows, see
    `encode`), read in `RankingOrder`, checkpointing into `out_dir`. Full fine-tuning
    gets a frozen copy of the start model as its reference; LoRA gets none, so TRL
    switches the adapter off for the reference log-probs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from stages.shared import training

    sizes = [len(rows) for rows in train]

    class PairsDPOTrainer(DPOTrainer):
        ranking_order: RankingOrder | None = None

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # encode() has tokenised and cut every pair already

        def _get_train_sampler(self, train_dataset=None):
            dataset = self.train_dataset if train_dataset is None else train_dataset
            if len(dataset) != sum(sizes):
                raise ValueError(f"the training set has {len(dataset)} rows, its rankings {sum(sizes)} pairs")
            self.ranking_order = RankingOrder(sizes, self.args.data_seed if self.args.data_seed is not None else self.args.seed)
            return self.ranking_order

        def _run_epoch(self, model, epoch, *args, **kwargs):
            # The dataloader passes the epoch on to its sampler, except on 2+ processes in the
            # epoch a resume starts mid-way: accelerate 1.15's skip_first_batches then wraps
            # the BatchSamplerShard, whose set_epoch path never reaches the sampler, which
            # would replay epoch 0's order. The Trainer knows the epoch: set it here.
            self.ranking_order.set_epoch(epoch)
            return super()._run_epoch(model, epoch, *args, **kwargs)

    args = DPOConfig(
        **training.trainer_arguments(cfg, out_dir, seed),
        beta=cfg.beta,
        loss_type=[cfg.loss_type],
        label_smoothing=cfg.label_smoothing,
        max_length=None,  # we tokenise and cut ourselves
        eval_strategy="no",
    )
    lora = cfg.method == "lora"
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return PairsDPOTrainer(
        model=model,
        ref_model=None if lora else AutoModelForCausalLM.from_pretrained(model_dir),
        args=args,
        train_dataset=Dataset.from_list([row for rows in train for row in rows]),
        processing_class=tokenizer,
        peft_config=cfg.lora.peft_config("CAUSAL_LM", model=model, key="dpo.lora") if lora else None,
        callbacks=[training.MarkCompleteCheckpoints()],
    )


# ---------------------------------------------------------------- evaluation


def held_out_logps(trainer, rows: list[dict], batch_size: int) -> dict[str, list[float]]:
    """Summed completion log-probs of every held-out pair under the policy and under
    the reference, the latter exactly as TRL computes it while training (its frozen
    copy, or the adapter switched off). Every process scores every pair."""
    import torch

    model = trainer.model
    was_training = model.training
    model.eval()
    out = {"policy_chosen": [], "policy_rejected": [], "ref_chosen": [], "ref_rejected": []}
    try:
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.data_collator(rows[start : start + batch_size]).items()}
            labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
            with torch.no_grad(), trainer.accelerator.autocast():
                per_token = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True, use_cache=False).log_probs
            chosen, rejected = per_token.float().sum(dim=1).chunk(2)
            ref_chosen, ref_rejected = trainer.compute_ref_log_probs(trainer.ref_model or model, batch)
            for key, values in (("policy_chosen", chosen), ("policy_rejected", rejected), ("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
                out[key] += values.float().cpu().tolist()
    finally:
        model.train(was_training)
    return out


def implicit_reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict:
    """Held-out metrics from summed completion log-probs (sequences or tensors, one
    entry per pair). The implicit reward is r(y) = beta * (log pi(y) - log pi_ref(y));
    a pair's margin is r(chosen) - r(rejected). `accuracy`: the share of pairs with a
    margin above 0; `ties`: the share with a margin of exactly 0 (every pair while
    the policy is the reference), which `accuracy` counts as wrong; `margin`: the mean
    margin."""
    import torch

    def as_tensor(values):
        return torch.as_tensor(values, dtype=torch.float64).reshape(-1)

    pc, pr, rc, rr = (as_tensor(v) for v in (policy_chosen, policy_rejected, ref_chosen, ref_rejected))
    if not len(pc) == len(pr) == len(rc) == len(rr) > 0:
        raise ValueError(f"need the same number (> 0) of log-probs in each, got {len(pc)}, {len(pr)}, {len(rc)}, {len(rr)}")
    margins = beta * ((pc - rc) - (pr - rr))
    return {
        "accuracy": (margins > 0).double().mean().item(),
        "ties": (margins == 0).double().mean().item(),
        "margin": margins.mean().item(),
        "pairs": len(margins),
    }
