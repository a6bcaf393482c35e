"""The evaluation report: PPO curves and score against KL as PNGs, a Markdown report and a terminal table."""

from __future__ import annotations

from pathlib import Path

CURVES = (  # (metrics.jsonl key, panel title)
    ("objective/scores", "train reward (normalised)"),
    ("reward/gold", "gold score (audit source)"),
    ("objective/kl", "KL from SFT (per episode)"),
    ("response/length", "response length (tokens)"),
)


def plot_ppo_curves(history: list[dict], path: Path) -> list[str]:
    """One PNG with a panel per curve that the history has; returns the file names written."""
    if not history:
        return []
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    panels = [(key, title) for key, title in CURVES if any(key in row for row in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        steps = [row["step"] for row in history if row.get(key) is not None]
        values = [row[key] for row in history if row.get(key) is not None]
        ax.plot(steps, values, marker="o", markersize=3, alpha=0.35, label="per step")
        if len(values) >= 6:  # a PPO batch is small and noisy: show the trend too
            k = 3
            smooth = [sum(values[max(0, i - k + 1) : i + 1]) / len(values[max(0, i - k + 1) : i + 1]) for i in range(len(values))]
            ax.plot(steps, smooth, linewidth=2, label=f"mean of last {k}")
            ax.legend(fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


SCORE_VS_KL = "score_vs_kl.png"


def plot_score_vs_kl(metrics: dict, path: Path) -> list[str]:
    """Every policy as one point, mean score against mean KL from SFT: what each method
    bought and how far it moved for it. A panel per score the run has (RM, gold)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = metrics["policies"]
    scores = [(key, title) for key, title in (("rm_score", "RM score (normalised)"), ("gold_score", "gold score")) if any(m[key] is not None for m in policies.values())]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.2 * len(scores), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], scores, strict=True):
        for name, m in policies.items():
            if m[key] is None or m["kl_from_sft"] is None:
                continue
            ax.scatter(m["kl_from_sft"], m[key], s=36)
            ax.annotate(name, (m["kl_from_sft"], m[key]), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel("KL from SFT (nats per answer)", fontsize=8)
        ax.set_ylabel(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def _save(fig, path: Path) -> list[str]:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path.name]


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(metrics: dict) -> list[str]:
    rows = ["| policy | RM score | gold score | KL from SFT | length (tokens) | ends with EOS |", "|---|---|---|---|---|---|"]
    for name, m in metrics["policies"].items():
        rows.append(
            f"| {name} | {_fmt(m['rm_score'], '+.3f')} | {_fmt(m['gold_score'], '.3f')} | {_fmt(m['kl_from_sft'], '.3f')} "
            f"| {_fmt(m['length'], '.1f')} | {_fmt(m['eos_fraction'], '.0%')} |"
        )
    return rows


def _answers(n: int) -> str:
    return "one response each" if n == 1 else f"{n} responses each (win rates pair a policy's i-th answer with SFT's)"


def render(metrics: dict, examples: list[dict], stages: dict[str, dict], plots: list[str], cfg) -> str:
    lines = ["# Evaluation report", ""]
    lines += [
        f"{metrics['prompts']} held-out prompts (`{cfg.prompts}`), {_answers(metrics.get('samples_per_prompt', 1))} per policy, sampled with "
        f"temperature {cfg.temperature}, top-k {cfg.top_k or 'off'}, top-p {cfg.top_p}, at most {cfg.max_new_tokens} new tokens, "
        f"the same random stream for every policy. RM scores are normalised with the reward model's held-out mean and std, "
        f"as PPO saw them. KL from SFT is the sum over response tokens of log pi(y) - log pi_sft(y), on each policy's own samples. "
        + (f"Gold scores come from `{metrics['judge']}`, which the reward model never saw." if metrics["judge"] else "No gold judge is configured."),
        "",
        *table(metrics),
        "",
        *win_rates_section(metrics),
        *criteria_section(metrics.get("criteria")),
    ]
    if SCORE_VS_KL in plots:
        lines += ["## Score against KL from SFT", "", f"![score against KL]({SCORE_VS_KL})", ""]
    curves = [p for p in plots if p != SCORE_VS_KL]
    if curves:
        lines += ["## PPO curves", ""] + [f"![PPO curves]({p})" for p in curves] + [""]
    lines += reward_model_section(metrics.get("reward_model", {}))
    lines += ["## Stages", "", "| stage | wall time | headline settings |", "|---|---|---|"]
    for name, manifest in stages.items():
        seconds = manifest.get("timings", {}).get("seconds")
        lines.append(f"| {name} | {_fmt(seconds, '.0f')} s | {_settings(name, manifest.get('config', {}))} |")
    lines.append(f"| eval | {metrics['eval_seconds']:.0f} s | {metrics['prompts']} prompts x {len(metrics['policies'])} policies |")
    lines += ["", "## Side by side", ""]
    for i, ex in enumerate(examples, 1):
        lines += [f"### {i}. {ex['prompt']}", ""]
        for name in (key for key in ex if key != "prompt"):
            row = ex[name]
            gold = "" if row.get("gold") is None else f", gold {row['gold']:.2f}"
            lines += [f"**{name}** (RM {row['rm_score']:+.2f}{gold}):", "", "> " + (row["response"].replace("\n", " ") or "(empty)"), ""]
    return "\n".join(lines)


def win_rates_section(metrics: dict) -> list[str]:
    """Every policy's win rate over SFT on the same prompts (ties count half), and where it came from."""
    compared = metrics.get("compared") or {}
    gold = bool(metrics["judge"])
    lines = ["Win rate over SFT, same prompt (ties count half):", "", "| policy | from | by reward model |" + (" by gold judge |" if gold else ""), "|---|---|---|" + ("---|" if gold else "")]
    for name, rates in metrics["win_rates"].items():
        where = f"`{compared[name]['path']}` (build {compared[name]['build_id'] or '-'})" if name in compared else "this run"
        lines.append(f"| {name} | {where} | {_fmt(rates['rm'], '.2f')} |" + (f" {_fmt(rates['gold'], '.2f')} |" if gold else ""))
    return lines + [""]


def criteria_section(criteria: dict | None) -> list[str]:
    """Each policy's share of each judge part (eval.criteria): what the gold score is made of."""
    if not criteria:
        return []
    parts = list(next(iter(criteria.values())))
    lines = ["## What the answers do (judge criteria)", "", "| policy | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
    lines += [f"| {name} | " + " | ".join(_fmt(shares.get(p), ".2f") for p in parts) + " |" for name, shares in criteria.items()]
    return lines + [""]


def reward_model_section(rm: dict) -> list[str]:
    """The reward model's held-out accuracy, by the one criterion a pair differs in (rm.criteria)."""
    if "accuracy" not in rm:
        return []
    lines = ["## Reward model", "", f"Held-out pairwise accuracy {rm['accuracy']:.3f} on {rm['pairs']} pairs."]
    by = rm.get("accuracy_by_criterion")
    if by:
        lines += ["", "| pairs that differ only in | pairs | accuracy |", "|---|---|---|"]
        lines += [f"| {kind} | {row['pairs']} | {row['accuracy']:.3f} |" for kind, row in by.items()]
    return lines + [""]


def _settings(name: str, config: dict) -> str:
    keys = {
        "base": ("model", "dtype"),
        "sft": ("method", "max_steps", "batch_size", "learning_rate"),
        "rm": ("method", "max_steps", "batch_size", "learning_rate"),
        "rlhf": ("advantage", "samples_per_prompt", "method", "steps", "batch_size", "ppo_epochs", "learning_rate", "kl_coef", "max_new_tokens", "temperature"),
        "dpo": ("loss_type", "beta", "method", "max_steps", "batch_size", "learning_rate"),
    }.get(name, ("method",))
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)


def relink(text: str, folder: str) -> str:
    """The report as seen from the run folder: image links point into `folder`."""
    for image in ("ppo_curves.png", SCORE_VS_KL):
        text = text.replace(f"]({image})", f"]({folder}/{image})")
    return text


def terminal_summary(metrics: dict) -> str:
    lines = ["", "Evaluation (held-out prompts, sampled):", *table(metrics), *criteria_section(metrics.get("criteria"))[2:]]
    for name, rates in metrics["win_rates"].items():
        lines.append(f"{name} vs SFT win rate: RM {_fmt(rates['rm'], '.2f')}" + (f", gold {_fmt(rates['gold'], '.2f')}" if metrics["judge"] else ""))
    return "\n".join(lines)
