"""Our GRPO gradient against TRL's GRPOTrainer on one real batch: are the two losses the
same function? Runs our rlhf stage on bench.grpo_child's setup for --step steps, keeps the
last step's batch, its LoRA weights before the update and the gradient the update took
(before clipping); then loads those weights into TRL's GRPOTrainer, computes its loss on
the same tokens and advantages, and prints both gradients' norms and the norm of their
difference, as one JSON line.

    python -m bench.trl_gradient --run runs/default --seed 8 --step 3 [--kl-bias-correction off]

The setting is applied alike on both sides (ours' rlhf.kl_bias_correction, TRL's
use_bias_correction_kl). TRL's loss is called through its private `_compute_loss`, so a
TRL upgrade may need this file touched; the reference log-probs are TRL's own (ours are
compared with them, not handed over).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import torch

from bench import grpo_child


def ours_last_step(run: Path, seed: int, steps: int, correction: bool, work: Path) -> dict:
    """Train our GRPO for `steps` steps and return the last update's inputs, its
    trainable weights before the update and the gradient it took, keyed by name."""
    import accelerate

    from engine import driver
    from stages import rlhf

    kept: dict = {}
    update, clip = driver.ppo_update, accelerate.Accelerator.clip_grad_norm_

    def keep_update(learner, batch, advantages, *args, **kwargs):
        kept.clear()
        kept.update(model=learner.model, weights={n: p.detach().clone() for n, p in learner.model.named_parameters() if p.requires_grad},
                    batch=batch, advantages=advantages, kl_coef=kwargs.get("kl_coef"))
        return update(learner, batch, advantages, *args, **kwargs)

    def keep_gradient(self, parameters, *args, **kwargs):
        kept["grads"] = {n: p.grad.detach().clone() for n, p in kept["model"].named_parameters() if p.grad is not None}
        return clip(self, parameters, *args, **kwargs)

    rows = [{"prompt": p} for p in grpo_child.train_prompts(steps * 4)]
    (work / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = grpo_child.ours_config("grpo", steps, 4, str(work / "prompts.jsonl"), str(work / "prompts.jsonl"))
    cfg = dataclasses.replace(cfg, kl_bias_correction=correction)
    driver.ppo_update, accelerate.Accelerator.clip_grad_norm_ = keep_update, keep_gradient
    try:
        rlhf.train(cfg, run / "sft", run / "sft", work / "policy", seed)
    finally:
        driver.ppo_update, accelerate.Accelerator.clip_grad_norm_ = update, clip
    return kept


def trl_gradient(run: Path, kept: dict, correction: bool, work: Path) -> dict:
    """TRL's GRPO loss on the kept batch, from the kept weights: its gradient by our names."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from stages.shared.settings import LoraSettings

    settings = {**grpo_child.trl_settings("grpo", 1, 4, 0, str(work / "trl")), "use_bias_correction_kl": correction}
    lora = grpo_child.SETUP["lora"]
    peft_config = LoraSettings(r=lora["r"], alpha=lora["alpha"], target_modules=lora["target_modules"]).peft_config("CAUSAL_LM", dropout=lora["dropout"])
    model = AutoModelForCausalLM.from_pretrained(run / "sft", dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[grpo_child.trl_reward], args=GRPOConfig(**settings), processing_class=AutoTokenizer.from_pretrained(run / "sft"),
                          train_dataset=Dataset.from_list([{"prompt": p} for p in grpo_child.train_prompts(4)]), peft_config=peft_config)
    # The same module paths under each side's wrapper and adapter name.
    ours = {n.split("base_model.model.", 1)[1].replace(".policy.", ".default."): n for n in kept["weights"]}
    params = {n.split("base_model.model.", 1)[1]: p for n, p in trainer.model.named_parameters() if p.requires_grad}
    if set(ours) != set(params):
        raise SystemExit(f"error: the LoRA parameters differ between the sides: {sorted(set(ours) ^ set(params))[:4]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(kept["weights"][ours[name]])
    batch, mask = kept["batch"], kept["batch"].response_mask
    ids = torch.cat([batch.queries, batch.responses], 1)
    attention = torch.cat([batch.query_mask.long(), mask.long()], 1)
    trainer.model.train()
    with torch.no_grad(), trainer.model.disable_adapter():
        ref = trainer._get_per_token_logps_and_entropies(trainer.model, ids, attention, mask.shape[1])[0]
    inputs = {"prompt_ids": batch.queries, "prompt_mask": batch.query_mask.long(), "completion_ids": batch.responses, "completion_mask": mask.long(),
              "advantages": kept["advantages"][:, 0], "ref_per_token_logps": ref}  # a GRPO advantage is one number per answer
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.zero_grad()
    trainer._compute_loss(trainer.model, inputs).backward()
    return {"grads": {ours[n]: p.grad for n, p in params.items()}, "ref_logprobs_max_diff": float((ref - batch.ref_logprobs)[mask].abs().max())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="run folder holding sft/")
    parser.add_argument("--seed", type=int, default=8)
    parser.add_argument("--step", type=int, default=3, help="compare the update of this step (from 2 on the policy differs from the reference)")
    parser.add_argument("--kl-bias-correction", choices=("on", "off"), default="on", help="on both sides")
    args = parser.parse_args(argv)
    correction = args.kl_bias_correction == "on"
    with tempfile.TemporaryDirectory(prefix="trl_gradient_") as tmp:
        work = Path(tmp)
        kept = ours_last_step(args.run, args.seed, args.step, correction, work)
        trl = trl_gradient(args.run, kept, correction, work)
    ours, theirs = kept["grads"], trl["grads"]
    norm = lambda tensors: float(sum(t.double().pow(2).sum() for t in tensors) ** 0.5)  # noqa: E731
    row = {"seed": args.seed, "step": args.step, "kl_bias_correction": correction, "answers": len(kept["batch"].responses),
           "grad_norm_ours": norm(ours.values()), "grad_norm_trl": norm(theirs.values()), "grad_norm_difference": norm(ours[n] - theirs[n] for n in ours),
           "ref_logprobs_max_diff": trl["ref_logprobs_max_diff"]}
    print("ROW " + json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
