"""The baseline for `make bench`, measured in the same session: TRL 1.12's PPOTrainer
(full models) on the bench's setup (batch 8, 32 new tokens, 1 PPO epoch, one minibatch,
fp32, temperature 0.7) with the run's sft and rm checkpoints and the demo prompts.

TRL 1.12 cannot share this project's environment (it pins other releases), so give it
a venv of its own and run this file with that venv's python, from the repository root:

    python3 -m venv /tmp/trl112 && /tmp/trl112/bin/pip install torch==2.13.0 trl==1.12.0 transformers==5.23.0
    /tmp/trl112/bin/python bench/trl_ppo.py [steps] [run_dir]    # default: 6 runs/default
    /tmp/trl112/bin/python bench/trl_ppo.py 24 runs/default --save /tmp/trl_policy --lr 1e-5 [--seed 1]

Prints one JSON line: seconds per step (the first is warm-up) and peak RSS. --save
keeps the trained policy, for `python -m bench.gain --policy trl=DIR`.
"""
import argparse
import json
import resource
import time
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
from trl.experimental.ppo import PPOConfig, PPOTrainer


class StepClock(TrainerCallback):
    """TRL's PPO loop calls on_step_end once per PPO batch (it never calls on_step_begin)."""

    def __init__(self):
        self.ends = []

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.time())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("steps", nargs="?", type=int, default=6)
    parser.add_argument("run", nargs="?", default="runs/default")
    parser.add_argument("--save", help="folder for the trained policy")
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    args_in = parser.parse_args()
    steps, run = args_in.steps, args_in.run
    tokenizer = AutoTokenizer.from_pretrained(f"{run}/sft", padding_side="left")
    rows = [json.loads(line) for line in Path("configs/data/demo_prompts.jsonl").read_text().splitlines()]
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False) for r in rows]
    dataset = Dataset.from_dict({"input_ids": [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]})
    args = PPOConfig(
        output_dir="/tmp/trl_bench_out", per_device_train_batch_size=8, gradient_accumulation_steps=1, num_mini_batches=1, num_ppo_epochs=1,
        total_episodes=8 * steps, response_length=32, temperature=0.7, stop_token="eos", learning_rate=args_in.lr, num_sample_generations=0,
        local_rollout_forward_batch_size=8, report_to="none", save_strategy="no", logging_steps=1, use_cpu=True, seed=args_in.seed,
    )
    clock = StepClock()
    trainer = PPOTrainer(
        args=args, processing_class=tokenizer, train_dataset=dataset, callbacks=[clock],
        model=AutoModelForCausalLM.from_pretrained(f"{run}/sft"), ref_model=AutoModelForCausalLM.from_pretrained(f"{run}/sft"),
        reward_model=AutoModelForSequenceClassification.from_pretrained(f"{run}/rm", num_labels=1),
        value_model=AutoModelForSequenceClassification.from_pretrained(f"{run}/rm", num_labels=1),
    )
    start = time.time()
    trainer.train()
    if args_in.save:
        trainer.save_model(args_in.save)
        tokenizer.save_pretrained(args_in.save)
    per_step = [b - a for a, b in zip([start, *clock.ends[:-1]], clock.ends, strict=True)]
    print(json.dumps({
        "trl_steps": steps,
        "seconds_per_step": [round(t, 2) for t in per_step],
        "seconds_per_batch_after_first": round(sum(per_step[1:]) / max(1, len(per_step) - 1), 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }))


if __name__ == "__main__":
    main()
