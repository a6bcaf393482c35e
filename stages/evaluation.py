"""Evaluation stage: every policy the run has (base, sft, rlhf, and dpo when the run
has it: every parent but the reward model) answers the same held-out prompts with the
same sampling settings, and the report says what changed.

Per policy: mean reward-model score (normalised as PPO saw it), mean gold score when
a judge is configured, win rate over SFT by both, the KL from SFT (summed over
response tokens, from each policy's own samples), response length and the fraction
ending in EOS. Then a plot of score against KL (one point per policy), the PPO
curves, and `report.md`, written into this stage's folder and, once that is in place
(`publish`), copied to `runs/<name>/report.md`.

A judge is any function `judge(prompt: str, response: str) -> float | None`, named
as `module:function`; None means it cannot rate that prompt. Without a judge the
report leaves the gold columns out. `criteria` names a function giving the judge's
parts (`demo.judge:gold_parts`: correct, warm opening, ...); the report gives each
policy's share of each. `compare_with` adds policy folders from other runs (the PPO
default next to a GRPO run), sampled and scored the same way.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipeline import checkpoint as ckpt
from pipeline.config import REQUIRED, SettingError, setting
from pipeline.fallbacks import Fallbacks
from stages import eval_report as report
from stages.shared import data
from stages.shared.judge import judged, load_judge, probe_judge, reward_stats
from stages.shared.settings import check_model_folder

RESERVED = ("base", "sft", "rm", "rlhf", "dpo")
"""Names of the run's own stages, which compare_with cannot take."""


@dataclasses.dataclass(frozen=True)
class OtherPolicy:
    name: str = setting(REQUIRED)
    """Its name in the report (not the name of one of the run's stages)."""
    path: str = setting(REQUIRED, path="local")
    """A policy folder, e.g. runs/default/rlhf; the report goes stale when it is rebuilt."""

    def __post_init__(self):
        if self.name in RESERVED or not self.name.isidentifier():
            raise SettingError("name", f"must be a plain name other than {', '.join(RESERVED)}, got {self.name!r}")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    prompts: str = setting("configs/data/demo_eval.jsonl", path="local")
    """Held-out prompts (JSONL rows with "prompt" or "messages"), never trained on."""
    judge: str | None = None
    """A gold judge as module:function, e.g. demo.judge:gold_score; null for none."""
    criteria: str | None = None
    """The judge's parts as module:function -> dict of name -> number or bool (e.g.
    demo.judge:gold_parts); each policy's mean of each part is reported. null: none."""
    compare_with: tuple[OtherPolicy, ...] = ()
    """Policies from other runs to evaluate alongside, as [{name: ppo, path: runs/default/rlhf}]."""
    max_new_tokens: int = 32
    temperature: float = 0.7
    """Sampling temperature for every policy; 0 is greedy."""
    top_k: int = 0
    top_p: float = 1.0
    max_prompt_length: int = 256
    batch_size: int = 64
    samples_per_prompt: int = 1
    """Answers each policy samples per prompt. A share of 0.17 on 64 answers has a standard
    error of 0.05, too wide to tell whether RLHF kept correctness; 4 answers a prompt halve it.
    Win rates pair a policy's i-th answer with SFT's i-th answer to the same prompt."""
    num_samples: int = setting(4, fingerprint=False)
    """Prompts shown side by side in the report."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise SettingError("max_new_tokens", "must be at least 1")
        if self.temperature < 0:
            raise SettingError("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise SettingError("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise SettingError("batch_size", "must be at least 1")
        if self.samples_per_prompt < 1:
            raise SettingError("samples_per_prompt", "must be at least 1")
        names = [p.name for p in self.compare_with]
        if len(set(names)) != len(names):
            raise SettingError("compare_with", f"names must differ, got {names}")


def check(cfg: EvalConfig) -> None:
    prompts = [p[-1]["content"] for p in data.read_prompts(cfg.prompts, "eval.prompts")]
    probe_judge(cfg.judge, "eval.judge", prompts)
    probe_judge(cfg.criteria, "eval.criteria", prompts, parts=True)
    for i, other in enumerate(cfg.compare_with):
        check_model_folder(other.path, f"eval.compare_with[{i}].path", "causal")


def headline(metrics: dict) -> str:
    if not metrics:
        return "-"
    sft, rlhf = metrics["policies"]["sft"], metrics["policies"]["rlhf"]
    line = f"RM score sft {sft['rm_score']:+.3f} -> rlhf {rlhf['rm_score']:+.3f}"
    if sft.get("gold_score") is not None:
        line += f", gold {sft['gold_score']:.3f} -> {rlhf['gold_score']:.3f} (win rate {metrics['win_rate_gold']:.2f})"
    return line + f", KL {rlhf['kl_from_sft']:.2f}"


def run(cfg: EvalConfig, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from engine.probes import layout_for

    start = time.time()
    out_dir.mkdir(parents=True, exist_ok=True)
    judge, criteria = load_judge(cfg.judge, "eval.judge"), load_judge(cfg.criteria, "eval.criteria")
    own = {name: folder for name, folder in inputs.items() if name != "rm"}
    folders = {**own, **{p.name: Path(p.path) for p in cfg.compare_with}}
    tokenizer = AutoTokenizer.from_pretrained(inputs["sft"])
    distinct = data.read_prompts(cfg.prompts, "eval.prompts", cfg.max_prompt_length, tokenizer)
    prompts = [p for p in distinct for _ in range(cfg.samples_per_prompt)]  # a prompt's answers side by side
    texts = [p[-1]["content"] for p in prompts]
    stats = reward_stats(inputs["rm"])
    note = Fallbacks("eval")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def causal_lm(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()

    reward_model = AutoModelForSequenceClassification.from_pretrained(inputs["rm"], num_labels=1, dtype=torch.float32).to(device).eval()
    reward_model.config.pad_token_id = tokenizer.pad_token_id
    reference = causal_lm(inputs["sft"])
    samples: dict[str, list[dict]] = {}
    for name, folder in folders.items():
        # SFT too is loaded apart from the reference, so its KL of ~0 is measured, not assumed.
        policy = causal_lm(folder)
        # Asked per policy: a policy folder may hold another architecture than the SFT model.
        layout = layout_for(policy, reference, reward_model, note=note)
        torch.manual_seed(seed)  # every policy draws from the same random stream
        samples[name] = sample_and_score(Scorers(policy, reference, reward_model, tokenizer, stats, layout), prompts, cfg)
        for row, text in zip(samples[name], texts, strict=True):
            row["gold"] = judged(judge, cfg.judge, "eval.judge", text, row["response"]) if judge else None
            if criteria:
                row["criteria"] = judged(criteria, cfg.criteria, "eval.criteria", text, row["response"], parts=True)
        print(f"[eval] {name}: {len(prompts)} responses to {len(distinct)} prompts sampled and scored")
        del policy

    metrics = summarize(samples, has_judge=judge is not None)
    metrics["criteria"] = criteria_shares(samples) if criteria else None
    metrics["prompts"] = len(distinct)
    metrics["samples_per_prompt"] = cfg.samples_per_prompt
    metrics["judge"] = cfg.judge
    shown = range(0, min(cfg.num_samples, len(distinct)) * cfg.samples_per_prompt, cfg.samples_per_prompt)  # each prompt's first answers
    examples = [{"prompt": texts[i], **{name: samples[name][i] for name in folders}} for i in shown]
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"prompt": text, **{name: samples[name][i] for name in folders}}) + "\n")
    history = _read_jsonl(inputs["rlhf"] / "metrics.jsonl")
    plots = report.plot_score_vs_kl(metrics, out_dir / report.SCORE_VS_KL) + report.plot_ppo_curves(history, out_dir / "ppo_curves.png")
    metrics["eval_seconds"] = round(time.time() - start, 1)
    rm_eval = _read_json(inputs["rm"] / "eval.json").get("after", {})
    metrics["reward_model"] = {k: rm_eval[k] for k in ("accuracy", "pairs", "accuracy_by_criterion") if k in rm_eval}
    metrics["fallbacks"] = note.taken
    stages = {name: _manifest(folder) for name, folder in inputs.items()}
    metrics["compared"] = {p.name: {"path": p.path, "build_id": _manifest(Path(p.path)).get("build_id")} for p in cfg.compare_with}
    text = report.render(metrics, examples, stages, plots, cfg)
    ckpt.write_text_atomic(out_dir / "report.md", text)
    ckpt.write_json_atomic(out_dir / "report.json", {"metrics": metrics, "examples": examples})
    print(report.terminal_summary(metrics))
    return metrics


def publish(folder: Path) -> None:
    """A copy of the promoted report at the top of the run, where people look first; its
    plot links point into eval/."""
    ckpt.write_text_atomic(folder.parent / "report.md", report.relink((folder / "report.md").read_text(), folder.name))


@dataclasses.dataclass
class Scorers:
    """A policy to sample from and what scores its answers."""

    policy: object
    reference: object  # the SFT model, for the KL
    reward_model: object
    tokenizer: object
    stats: tuple[float, float] | None  # the reward model's held-out mean and std
    layout: object  # engine.packing.Layout that all three models read right


def sample_and_score(models: Scorers, prompts: list[list[dict]], cfg: EvalConfig) -> list[dict]:
    """One sampled response per prompt, with its RM score, KL from the reference,
    length and EOS flag, in prompt order."""
    import torch

    from engine import sampling
    from engine.forward import response_logits, reward_scores
    from engine.packing import pack
    from rl.rewards import normalize_scores, per_token_kl
    from rl.tokens import logprobs_from_logits

    tokenizer = models.tokenizer
    config = sampling.generation_config(tokenizer, sampling.Sampling(cfg.max_new_tokens, cfg.temperature, cfg.top_k, cfg.top_p))
    # Log-probs at the sampling temperature, as PPO's KL penalty measures them.
    temperature = cfg.temperature if cfg.temperature > 0 else 1.0
    rows = []
    for start in range(0, len(prompts), cfg.batch_size):
        chunk = prompts[start : start + cfg.batch_size]
        with torch.no_grad():
            queries, query_mask, responses, mask, ended, lengths = sampling.sample_batch(models.policy, tokenizer, chunk, config, next(models.policy.parameters()).device)
            packed = pack(queries, query_mask, responses, mask, models.layout)
            logprobs = logprobs_from_logits(response_logits(models.policy, packed), packed.tokens, temperature)
            ref_logprobs = logprobs_from_logits(response_logits(models.reference, packed), packed.tokens, temperature)
            kl = per_token_kl(packed.unpack(logprobs, 0.0), packed.unpack(ref_logprobs, 0.0), mask).sum(1)
            raw_scores = reward_scores(models.reward_model, packed)
            scores = normalize_scores(raw_scores, models.stats, None) if models.stats else raw_scores
        for r in range(len(chunk)):
            rows.append({
                "response": tokenizer.decode(responses[r, : lengths[r]], skip_special_tokens=True).strip(),
                "rm_score": round(scores[r].item(), 4),
                "kl_from_sft": round(kl[r].item(), 4),
                "length": int(lengths[r]),
                "ended": bool(ended[r]),
            })
    return rows


def summarize(samples: dict[str, list[dict]], has_judge: bool) -> dict:
    """Means per policy and RLHF-vs-SFT win rates (a tie counts half)."""

    def mean(values):
        values = [v for v in values if v is not None]
        return sum(values) / len(values) if values else None

    policies = {}
    for name, rows in samples.items():
        policies[name] = {
            "rm_score": mean(r["rm_score"] for r in rows),
            "gold_score": mean(r["gold"] for r in rows) if has_judge else None,
            "kl_from_sft": mean(r["kl_from_sft"] for r in rows),
            "length": mean(r["length"] for r in rows),
            "eos_fraction": mean(float(r["ended"]) for r in rows),
        }

    def win_rate(name, key):
        pairs = [(a[key], b[key]) for a, b in zip(samples[name], samples["sft"], strict=True) if a[key] is not None and b[key] is not None]
        if not pairs:
            return None
        return sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)

    others = {name: {"rm": win_rate(name, "rm_score"), "gold": win_rate(name, "gold") if has_judge else None} for name in samples if name not in ("base", "sft")}
    return {"policies": policies, "win_rate_rm": win_rate("rlhf", "rm_score"), "win_rate_gold": win_rate("rlhf", "gold") if has_judge else None, "win_rates": others}


def criteria_shares(samples: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per policy, the mean of each judge part over the prompts it rates (a bool part's
    mean is the share of answers that have it: the correctness share)."""
    shares = {}
    for name, rows in samples.items():
        rated = [r["criteria"] for r in rows if r.get("criteria") is not None]
        shares[name] = {part: sum(float(c[part]) for c in rated) / len(rated) for part in (rated[0] if rated else {})}
    return shares


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else {}
