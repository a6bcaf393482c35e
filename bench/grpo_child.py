"""One run of `bench.trl_grpo`, in a process of its own so that its peak RSS is its own:
train with TRL's GRPOTrainer / RLOOTrainer or with our rlhf stage, or score a policy
folder on held-out prompts. Prints one line, `ROW {json}`, for the parent to read.

    python -m bench.grpo_child train --side trl --algo grpo --run runs/default --steps 12 --out /tmp/x
    python -m bench.grpo_child score --policy /tmp/x --tokenizer runs/default/sft

Every setting both sides share is in SETUP; each side's translation of it is
`trl_settings` and `ours_config`.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

PROMPTS = "configs/data/demo_prompts.jsonl"
EVAL_PROMPTS = "configs/data/demo_eval.jsonl"
REWARD = "demo.rewards:gold"
SETUP = {
    "samples_per_prompt": 4,  # K
    "max_new_tokens": 32,
    "temperature": 0.7, "top_k": 0, "top_p": 1.0,  # plain temperature sampling, so the KL estimates are unbiased
    "learning_rate": 3e-4, "lr_scheduler": "constant", "warmup_steps": 0,  # the default config's LoRA rate
    "kl_coef": 0.05,  # TRL's beta
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},  # ours trains without dropout
    # torch AdamW as ours builds it: eps 1e-5 (N+ details), weight decay 0.01 (torch's default)
    "adam_epsilon": 1e-5, "weight_decay": 0.01, "adam_betas": [0.9, 0.999], "max_grad_norm": 1.0,
    "clip_range": 0.2,  # inert here: one update per generation batch, so the ratio is 1
    "precision": "fp32", "reward": REWARD, "reward_normalized": False,
}


def peak_rss_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


def train_prompts(n: int) -> list[list[dict]]:
    """The first n demo PPO prompts as chat messages, read the way our stage reads them."""
    from stages.shared import data

    prompts = data.read_prompts(PROMPTS, "prompts")
    if len(prompts) < n:
        sys.exit(f"error: {PROMPTS} has {len(prompts)} prompts, fewer than the {n} the run needs")
    return prompts[:n]


def trl_reward(prompts, completions, **kwargs):
    """demo.rewards:gold in TRL's reward_funcs signature. TRL hands conversational
    prompts and completions as message lists: read them as our driver does (the last
    user message; the decoded answer, stripped). None stays None: TRL turns it to NaN
    and leaves the answer out of its group's baseline, as ours does."""
    from demo.rewards import gold
    from engine.reward_functions import prompt_text

    texts = [prompt_text(p) if isinstance(p, list) else p for p in prompts]
    answers = [(c[-1]["content"] if isinstance(c, list) else c).strip() for c in completions]
    return gold(texts, answers)


trl_reward.__name__ = "gold"  # TRL names its reward metrics after the function


def trl_settings(algo: str, steps: int, prompts_per_step: int, seed: int, out: str) -> dict:
    """GRPOConfig / RLOOConfig keyword arguments for SETUP. A dataclass refuses an unknown
    keyword, and `run_trl` checks each value reads back unchanged after __post_init__."""
    from engine.device import cpu_only

    s, batch = SETUP, prompts_per_step * SETUP["samples_per_prompt"]
    settings = {
        "output_dir": out, "max_steps": steps, "seed": seed, "report_to": [], "save_strategy": "no", "logging_steps": 1,
        "use_cpu": cpu_only(), "bf16": False, "fp16": False,  # the device ours picks, in fp32
        # TRL's default is on (as gradient_checkpointing, which transformers 5 renamed); ours never recomputes activations
        "activation_checkpointing": False,
        "disable_dropout": True,  # ours loads every model with dropout off
        "use_vllm": False,
        # One optimiser step per generation batch of P prompts x K answers, one pass over it.
        "per_device_train_batch_size": batch, "gradient_accumulation_steps": 1, "steps_per_generation": 1, "num_iterations": 1,
        "num_generations": s["samples_per_prompt"], "max_completion_length": s["max_new_tokens"],
        "temperature": s["temperature"], "top_k": s["top_k"], "top_p": s["top_p"],
        "learning_rate": s["learning_rate"], "lr_scheduler_type": s["lr_scheduler"], "warmup_steps": s["warmup_steps"],
        "adam_epsilon": s["adam_epsilon"], "weight_decay": s["weight_decay"], "adam_beta1": s["adam_betas"][0], "adam_beta2": s["adam_betas"][1],
        "max_grad_norm": s["max_grad_norm"], "beta": s["kl_coef"], "epsilon": s["clip_range"],
        "mask_truncated_completions": False,  # ours trains on truncated answers too (its missing-EOS penalty is 0 here)
    }
    if algo == "grpo":
        from rl.advantages import ESTIMATORS

        # Ours grpo: group mean and std (1e-4 added), k3 KL loss term weighted by pi / pi_old
        # (bias-corrected, TRL's default too), per-answer token mean then mean over answers.
        settings.update(loss_type="grpo", scale_rewards="group", use_bias_correction_kl=ESTIMATORS["grpo"].kl_bias_correction)
    else:
        # Ours rloo: the leave-one-out advantage as is, k1 KL in the reward. TRL's RLOO has no loss
        # aggregation setting: it takes the ratio of whole-answer log-probs, averaged over answers,
        # where ours averages per-token terms over tokens; with one update per batch (ratio 1) both
        # gradients are sum_i A_i grad log pi(y_i), scaled by 1/answers vs 1/tokens.
        settings.update(normalize_advantages=False)
    return settings


def run_trl(algo: str, run: Path, steps: int, prompts_per_step: int, seed: int, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from stages.shared.settings import LoraSettings

    class StepClock(TrainerCallback):
        """Wall time at the start of training and at each optimiser step's end."""

        def __init__(self):
            self.marks = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):
            self.marks.append(time.perf_counter())

    config_class, trainer_class = (GRPOConfig, GRPOTrainer) if algo == "grpo" else (RLOOConfig, RLOOTrainer)
    settings = trl_settings(algo, steps, prompts_per_step, seed, str(out / "trl_output"))
    args = config_class(**settings)
    changed = {k: (v, getattr(args, k)) for k, v in settings.items() if getattr(args, k) != v}
    if changed or args.gradient_checkpointing or args.generation_batch_size != settings["per_device_train_batch_size"]:
        raise SystemExit(f"error: {config_class.__name__} rewrote settings (given, now): {changed}, gradient_checkpointing "
                         f"{args.gradient_checkpointing}, generation_batch_size {args.generation_batch_size}")
    lora = SETUP["lora"]
    peft_config = LoraSettings(r=lora["r"], alpha=lora["alpha"], target_modules=lora["target_modules"]).peft_config("CAUSAL_LM", dropout=lora["dropout"])
    tokenizer = AutoTokenizer.from_pretrained(run / "sft")
    dataset = Dataset.from_list([{"prompt": p} for p in train_prompts(steps * prompts_per_step)])
    clock = StepClock()
    model = AutoModelForCausalLM.from_pretrained(run / "sft", dtype=torch.float32)
    trainer = trainer_class(model=model, reward_funcs=[trl_reward], args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=[clock], peft_config=peft_config)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()  # a plain folder, scored like ours
    merged.save_pretrained(out / "policy")
    tokenizer.save_pretrained(out / "policy")
    # TRL's own per-step log (reward, KL, lengths), beside our metrics.jsonl, to compare runs step by step
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))
    logged = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    per_step = [b - a for a, b in zip(clock.marks, clock.marks[1:])]
    return {"seconds_per_step": per_step, "train_call_seconds": train_seconds, "train_reward_first_last": [logged[0], logged[-1]],
            "settings": {**args.to_dict(), "trainer": trainer_class.__name__, "peft_config": peft_config.to_dict(), "trainable_parameters": trainable,
                         "eos_token_ids": trainer.eos_token_ids}}


def ours_config(algo: str, steps: int, prompts_per_step: int, train_file: str, held_file: str):
    from stages.rlhf import RlhfConfig, RlhfData
    from stages.rlhf_rewards import RewardSpec
    from stages.shared.settings import LoraSettings

    s, batch, lora = SETUP, prompts_per_step * SETUP["samples_per_prompt"], SETUP["lora"]
    return RlhfConfig(
        data=RlhfData(prompts=train_file, eval_prompts=held_file), method="lora",
        lora=LoraSettings(r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"], target_modules=lora["target_modules"]),
        advantage=algo, samples_per_prompt=s["samples_per_prompt"], steps=steps,
        batch_size=batch, minibatch_size=batch, microbatch_size=batch, ppo_epochs=1,
        learning_rate=s["learning_rate"], lr_scheduler=s["lr_scheduler"], max_new_tokens=s["max_new_tokens"],
        temperature=s["temperature"], top_k=s["top_k"], top_p=s["top_p"], kl_coef=s["kl_coef"],
        clip_range=s["clip_range"], max_grad_norm=s["max_grad_norm"], precision=s["precision"],
        # The raw reward, as TRL sees it: no standardisation, no missing-EOS penalty (TRL has none).
        rewards=(RewardSpec(source=REWARD, normalize=False),), normalize_scores=False, missing_eos_penalty=0.0,
        save_steps=10_000, sample_steps=10_000, num_samples=1, eval_batch_size=1,
    )


def run_ours(algo: str, run: Path, steps: int, prompts_per_step: int, seed: int, out: Path) -> dict:
    from dataclasses import asdict

    from engine import driver
    from stages import rlhf
    from stages.shared import data
    from stages.shared.training import load_tokenizer

    # The same first P prompts TRL trains on; our stage's own greedy held-out check gets
    # a single prompt, to keep it out of the way (the gain is scored apart, alike for both).
    rows = [{"prompt": p} for p in train_prompts(steps * prompts_per_step)]
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "held.jsonl").write_text(json.dumps({"prompt": data.read_prompts(EVAL_PROMPTS, "eval")[0]}) + "\n")
    cfg = ours_config(algo, steps, prompts_per_step, str(out / "prompts.jsonl"), str(out / "held.jsonl"))
    rlhf.check(cfg)
    # time/step in metrics.jsonl sums the driver's timed phases; to time steps as TRL's
    # callback does (wall clock, bookkeeping included), mark the loop's start and each
    # step's end (_log_step runs once per step, after its update).
    marks, before_training, log_step = [], driver.before_training, driver._log_step
    driver.before_training = lambda *a: (before_training(*a), marks.append(time.perf_counter()))[0]
    driver._log_step = lambda *a: (log_step(*a), marks.append(time.perf_counter()))[0]
    start = time.perf_counter()
    metrics = rlhf.train(cfg, run / "sft", run / "sft", out / "policy", seed)  # no reward model: the rm folder is never read
    train_seconds = time.perf_counter() - start
    logged = [json.loads(line) for line in (out / "policy" / "metrics.jsonl").read_text().splitlines()]
    return {"seconds_per_step": [b - a for a, b in zip(marks, marks[1:])], "phase_seconds_per_step": [r["time/step"] for r in logged],
            "train_call_seconds": train_seconds, "train_reward_first_last": [logged[0]["reward/gold"], logged[-1]["reward/gold"]],
            "settings": {**asdict(cfg), "objective": metrics["objective"], "trainable_parameters": metrics["trainable_parameters"], "fallbacks": metrics["fallbacks"],
                         "eos_token_ids": [load_tokenizer(run / "sft").eos_token_id]}}


def score(policy: Path, tokenizer_dir: Path, n_prompts: int, seed: int) -> dict:
    """Mean gold reward of `policy` on the first n held-out prompts, one answer each,
    sampled as in training (temperature 0.7, 32 new tokens) from a fixed seed: the same
    code and random stream for every policy, whichever trainer made it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from demo.rewards import gold
    from engine.chat import encode_prompt
    from engine.reward_functions import prompt_text
    from stages.shared import data

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(policy, dtype=torch.float32).eval()
    prompts = data.read_prompts(EVAL_PROMPTS, "eval")[:n_prompts]
    batch = tokenizer.pad({"input_ids": [encode_prompt(tokenizer, p) for p in prompts]}, padding_side="left", return_tensors="pt")
    generation = GenerationConfig(do_sample=True, temperature=SETUP["temperature"], top_k=SETUP["top_k"], top_p=SETUP["top_p"], max_new_tokens=SETUP["max_new_tokens"],
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**batch, generation_config=generation)
    answers = [a.strip() for a in tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
    ratings = [r for r in gold([prompt_text(p) for p in prompts], answers) if r is not None]
    return {"policy": str(policy), "eval_prompts": len(prompts), "rated": len(ratings), "mean_reward": statistics.fmean(ratings), "eval_seed": seed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train")
    train.add_argument("--side", choices=("trl", "ours"), required=True)
    train.add_argument("--algo", choices=("grpo", "rloo"), required=True)
    train.add_argument("--run", type=Path, required=True)
    train.add_argument("--steps", type=int, required=True)
    train.add_argument("--prompts-per-step", type=int, required=True)
    train.add_argument("--seed", type=int, required=True)
    train.add_argument("--out", type=Path, required=True, help="an empty folder; the trained policy goes to OUT/policy")
    scoring = sub.add_parser("score")
    scoring.add_argument("--policy", type=Path, required=True)
    scoring.add_argument("--tokenizer", type=Path, required=True)
    scoring.add_argument("--prompts", type=int, required=True)
    scoring.add_argument("--seed", type=int, required=True)
    args = parser.parse_args(argv)
    if args.command == "score":
        row = score(args.policy, args.tokenizer, args.prompts, args.seed)
    else:
        args.out.mkdir(parents=True, exist_ok=True)
        runner = run_trl if args.side == "trl" else run_ours
        row = runner(args.algo, args.run, args.steps, args.prompts_per_step, args.seed, args.out)
        timed = row["seconds_per_step"][1:] or row["seconds_per_step"]  # the first step is warm-up
        episodes_per_step = args.prompts_per_step * SETUP["samples_per_prompt"]
        row.update(seconds_per_step=[round(t, 3) for t in row["seconds_per_step"]], seconds_per_step_median=round(statistics.median(timed), 3),
                   episodes_per_second=round(episodes_per_step / statistics.median(timed), 4), episodes=episodes_per_step * len(row["seconds_per_step"]),
                   train_call_seconds=round(row["train_call_seconds"], 2), policy=str(args.out / "policy"))
    import torch

    print("ROW " + json.dumps({**row, "peak_rss_gb": peak_rss_gb(), "torch_threads": torch.get_num_threads()}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
