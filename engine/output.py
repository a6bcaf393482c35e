"""What the PPO stage measures and leaves behind: greedy held-out scores before and
after, rollout samples, and the final folders (the policy, value/, samples.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.forward import reward_scores
from engine.models import Models
from engine.packing import Layout, pack
from engine.rewards import Sources, episode_texts
from engine.sampling import sample_batch
from engine.sharding import whole
from pipeline import checkpoint as ckpt
from rl.rewards import normalize_scores
from rl.tokens import sequence_lengths
from rl.trajectory import Rollout


@dataclass
class HeldOut:
    """What the held-out check needs from the run."""

    accelerator: object
    models: Models
    tokenizer: object
    settings: object  # the rlhf config: max_new_tokens, eval_batch_size, score_clip, num_samples
    sources: Sources  # the reward sources; the held-out score is their train reward with fixed normalisers
    layout: Layout


@torch.no_grad()
def evaluate_policy(run: HeldOut, prompts: list[list[dict]], keep_text: int = 0) -> dict:
    """Greedy responses to held-out prompts, scored like the training reward before any
    penalty, but with fixed normalisers (reward models by their held-out statistics,
    functions raw) so that before and after compare; `sources` holds each source's
    mean raw rating. Prompts are shared among processes."""
    from accelerate.utils import gather_object
    from transformers import GenerationConfig

    accelerator, tokenizer, cfg = run.accelerator, run.tokenizer, run.settings
    greedy = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    policy = run.models.trained.policy
    policy.use()
    rows = []
    with accelerator.split_between_processes(list(enumerate(prompts)), apply_padding=True) as mine, whole(accelerator, run.models.trained):
        for start in range(0, len(mine), cfg.eval_batch_size):
            chunk = mine[start : start + cfg.eval_batch_size]
            queries, query_mask, responses, mask, ended, lengths = sample_batch(policy.model, tokenizer, [p for _, p in chunk], greedy, accelerator.device)
            packed = pack(queries, query_mask, responses, mask, run.layout)
            model_scores = [reward_scores(scorer, packed) for scorer in run.models.scorers]
            model_scores = torch.stack(model_scores, 1) if model_scores else queries.new_zeros((len(chunk), 0), dtype=torch.float32)
            texts = episode_texts(tokenizer, [p for _, p in chunk], responses, mask) if run.sources.needs_text else None
            ratings = run.sources.rate(model_scores, texts)
            scores = normalize_scores(run.sources.train_reward(ratings, running=False)[0], None, cfg.score_clip)
            for r, (index, _) in enumerate(chunk):
                text = tokenizer.decode(responses[r, : lengths[r]], skip_special_tokens=True)
                rows.append((index, scores[r].item(), bool(ended[r]), int(lengths[r]), text, ratings[r].tolist()))
    rows = sorted({r[0]: r for r in gather_object(rows)}.values())
    result = {
        "score": sum(r[1] for r in rows) / len(rows),
        "eos_fraction": sum(r[2] for r in rows) / len(rows),
        "length": sum(r[3] for r in rows) / len(rows),
        "prompts": len(rows),
        "sources": {source.name: _nanmean([r[5][i] for r in rows]) for i, source in enumerate(run.sources.sources)},
    }
    if keep_text:
        result["samples"] = [{"prompt": prompts[r[0]][-1]["content"], "response": r[4], "score": r[1]} for r in rows[:keep_text]]
    return result


def _nanmean(values: list[float]) -> float | None:
    known = [v for v in values if v == v]
    return sum(known) / len(known) if known else None


def before_training(run: HeldOut, held: list[list[dict]], out_dir: Path) -> dict:
    """The SFT policy's held-out score, kept in the work folder so a resumed run
    reports the true starting point."""
    path = out_dir / "before_training.json"
    if path.exists():
        return json.loads(path.read_text())
    result = evaluate_policy(run, held, keep_text=run.settings.num_samples)
    if run.accelerator.is_main_process:
        ckpt.write_json_atomic(path, result)
    return result


def write_rollout_samples(out_dir: Path, tokenizer, batch: Rollout, scores, step: int) -> None:
    lengths = sequence_lengths(batch.response_mask)
    with open(out_dir / "samples.jsonl", "a", encoding="utf-8") as f:
        for r in range(min(2, len(lengths))):
            prompt = tokenizer.decode(batch.queries[r][batch.query_mask[r].bool()], skip_special_tokens=False)
            response = tokenizer.decode(batch.responses[r, : lengths[r]], skip_special_tokens=False)
            f.write(json.dumps({"step": step, "prompt": prompt, "response": response, "score": scores[r].item()}) + "\n")


def save_final(accelerator, trained, tokenizer, out_dir: Path, eval_before: dict, eval_after: dict) -> None:
    """The policy as a plain causal-LM folder, the value model (if the run has one) in
    value/ as a plain sequence-classification folder, and held-out samples before and after."""
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        return
    policy, value = trained.policy.merged_copy(), trained.value.save_model(trained.policy)
    policy.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if value is not None:  # critic-free runs have none
        value.save_pretrained(out_dir / "value")
        tokenizer.save_pretrained(out_dir / "value")
    ckpt.write_json_atomic(out_dir / "eval.json", {"before": eval_before, "after": eval_after})
    pairs = zip(eval_before.get("samples", []), eval_after.get("samples", []), strict=False)
    samples = [{"prompt": b["prompt"], "sft": b["response"], "sft_score": b["score"], "ppo": a["response"], "ppo_score": a["score"]} for b, a in pairs]
    (out_dir / "samples.md").write_text(_samples_markdown(samples), encoding="utf-8")


def _samples_markdown(samples: list[dict]) -> str:
    lines = ["# Greedy responses to held-out prompts, SFT policy vs PPO policy", ""]
    for i, s in enumerate(samples, 1):
        lines.append(f"## {i}. {s['prompt']}")
        for who in ("sft", "ppo"):
            lines += [f"**{who.upper()}** (score {s[who + '_score']:+.3f}):", "", "> " + (s[who] or "(empty)").replace("\n", "\n> "), ""]
    return "\n".join(lines)
