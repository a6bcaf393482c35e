"""What the PPO stage measures and leaves behind: greedy held-out scores before and
after, rollout samples, and the final folders (policy, value/, samples.md)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from pipeline import checkpoint as ckpt
from stages import generation, ppo, rollout


@torch.no_grad()
def evaluate_policy(accelerator, model, reward_model, tokenizer, prompts, cfg, stats, keep_text: int = 0) -> dict:
    """Greedy responses to held-out prompts, scored by the reward model (normalised
    like the training scores, before any penalty). Prompts are shared among processes."""
    from accelerate.utils import gather_object
    from transformers import GenerationConfig

    greedy = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model.use("policy")
    rows = []
    with accelerator.split_between_processes(list(enumerate(prompts)), apply_padding=True) as mine:
        for start in range(0, len(mine), cfg.eval_batch_size):
            chunk = mine[start : start + cfg.eval_batch_size]
            queries, query_mask, responses, mask, ended, lengths = generation.sample_batch(model.policy, tokenizer, [p for _, p in chunk], greedy, accelerator.device)
            packed = rollout.pack(queries, query_mask, responses, mask, rollout.layout_for(reward_model))
            scores = ppo.normalize_scores(rollout.reward_scores(reward_model, packed), stats, cfg.score_clip)
            for r, (index, _) in enumerate(chunk):
                text = tokenizer.decode(responses[r, : lengths[r]], skip_special_tokens=True)
                rows.append((index, scores[r].item(), bool(ended[r]), int(lengths[r]), text))
    rows = sorted({r[0]: r for r in gather_object(rows)}.values())
    result = {
        "score": sum(r[1] for r in rows) / len(rows),
        "eos_fraction": sum(r[2] for r in rows) / len(rows),
        "length": sum(r[3] for r in rows) / len(rows),
        "prompts": len(rows),
    }
    if keep_text:
        result["samples"] = [{"prompt": prompts[r[0]][-1]["content"], "response": r[4], "score": r[1]} for r in rows[:keep_text]]
    return result


def before_training(accelerator, model, reward_model, tokenizer, held, cfg, stats, out_dir: Path) -> dict:
    """The SFT policy's held-out score, kept in the work folder so a resumed run
    reports the true starting point."""
    path = out_dir / "before_training.json"
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_policy(accelerator, model, reward_model, tokenizer, held, cfg, stats, keep_text=cfg.num_samples)
    if accelerator.is_main_process:
        ckpt.write_json_atomic(path, result)
    return result


def write_rollout_samples(out_dir: Path, tokenizer, batch: rollout.Rollout, scores, step: int) -> None:
    lengths = ppo.sequence_lengths(batch.response_mask)
    with open(out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for r in range(min(2, len(lengths))):
            prompt = tokenizer.decode(batch.queries[r][batch.query_mask[r].bool()], skip_special_tokens=False)
            response = tokenizer.decode(batch.responses[r, : lengths[r]], skip_special_tokens=False)
            f.write(json.dumps({"step": step, "prompt": prompt, "response": response, "score": scores[r].item()}) + "\n")


def save_final(accelerator, model, tokenizer, out_dir: Path, eval_before: dict, eval_after: dict) -> None:
    """The policy as a plain causal-LM folder, the value model in value/ as a plain
    sequence-classification folder, and held-out samples before and after."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    if model.shared:  # value/ is the policy's backbone under the value head
        policy = copy.deepcopy(model.policy).merge_and_unload() if model.lora else model.policy
        value = _value_model_from(policy, model.value_head)
    elif model.on_reward_model:  # value/ is the reward model with the value adapter merged, under the value head
        policy = copy.deepcopy(model.policy).merge_and_unload()
        value = _value_model_from(copy.deepcopy(model.value_model).merge_and_unload(), model.value_head)
    elif model.lora:  # merge each adapter into its own copy of the shared weights
        policy = copy.deepcopy(model.policy)
        policy.delete_adapter("value")
        policy = policy.merge_and_unload()
        value_lm = copy.deepcopy(model.policy)
        value_lm.set_adapter("value")
        value_lm.delete_adapter("policy")
        value = _value_model_from(value_lm.merge_and_unload(), model.value_head)
    else:
        policy, value = model.policy, model.value_model
    policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    value.save_pretrained(out_dir / "value")
    tokenizer.save_pretrained(out_dir / "value")
    ckpt.write_json_atomic(out_dir / "eval.json", {"before": eval_before, "after": eval_after})
    pairs = zip(eval_before.get("samples", []), eval_after.get("samples", []), strict=False)
    samples = [{"prompt": b["prompt"], "sft": b["response"], "sft_score": b["score"], "ppo": a["response"], "ppo_score": a["score"]} for b, a in pairs]
    (out_dir / "samples.md").write_text(_samples_markdown(samples), encoding="utf-8")


def _value_model_from(causal_lm, head):
    """A sequence-classification model with this backbone and head, so value/ loads
    with AutoModelForSequenceClassification like the reward model."""
    from transformers import AutoModelForSequenceClassification

    config = copy_config(causal_lm.config)
    value = AutoModelForSequenceClassification.from_config(config)
    value.base_model.load_state_dict(causal_lm.base_model.state_dict())
    value.score.load_state_dict(head.state_dict())
    return value


def copy_config(config):
    config = copy.deepcopy(config)
    config.num_labels = 1
    config.architectures = None
    return config


def _samples_markdown(samples: list[dict]) -> str:
    lines = ["# Greedy responses to held-out prompts, SFT policy vs PPO policy", ""]
    for i, s in enumerate(samples, 1):
        lines.append(f"## {i}. {s['prompt']}")
        for who in ("sft", "ppo"):
            lines += [f"**{who.upper()}** (score {s[who + '_score']:+.3f}):", "", "> " + (s[who] or "(empty)").replace("\n", "\n> "), ""]
    return "\n".join(lines)
