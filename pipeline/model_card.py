"""Model cards: README.md in a policy folder, written from its manifest: the lineage down to
the base model (each upstream build id, each data file's content hash), the resolved config,
training and eval figures, versions and every fallback. It reads manifests only and imports no
stage, so a new stage gets a card too; the same manifests always give the same text."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

import yaml

from pipeline import checkpoint as ckpt
from pipeline.summary import duration

CARD = "README.md"
WHAT = {"base": "imports the base model", "sft": "supervised fine-tuning", "rm": "trains a reward model", "rlhf": "reinforcement learning against the reward model", "dpo": "direct preference optimisation"}
ESTIMATORS = {"gae": "PPO", "grpo": "GRPO", "rloo": "RLOO", "reinforce_baseline": "REINFORCE++-baseline", "dr_grpo": "Dr. GRPO"}
EVAL_ROWS = (("rm_score", "RM score (normalised)", "{:+.3f}"), ("gold_score", "gold score", "{:.3f}"), ("kl_from_sft", "KL from SFT (nats)", "{:.2f}"), ("length", "length (tokens)", "{:.1f}"), ("eos_fraction", "ends with EOS", "{:.0%}"))


def ancestors(manifest: dict) -> dict[str, dict]:
    """Every upstream stage's manifest by name, nearest first, from the `parents` folders
    (paths as recorded). One that cannot be read, or whose folder now holds another build,
    is a stub with the recorded ids and a "problem"; its own parents stay unknown."""
    found: dict[str, dict] = {}
    queue = [manifest]
    while queue:
        for name, record in (queue.pop(0).get("parents") or {}).items():
            if name in found or name == manifest.get("stage"):
                continue
            record = record if isinstance(record, dict) else {}
            folder = Path(str(record["path"])) if record.get("path") else None
            parent = ckpt.read_manifest(folder) if folder else None
            problem = None
            if parent is None:
                why = "no folder recorded" if folder is None else ckpt.manifest_problem(folder) or f"{folder / ckpt.MANIFEST} does not exist"
                problem = f"not found: {why}"
            elif record.get("build_id") and parent.get("build_id") != record["build_id"]:
                problem = f"replaced: {folder} now holds build {parent.get('build_id')}, not the recorded {record['build_id']}"
            if problem:
                parent = {"stage": name, "build_id": record.get("build_id"), "fingerprint": record.get("fingerprint"), "problem": problem}
            found[name] = parent
            queue.append(parent)
    return found


def policy_figures(eval_metrics: dict, policy: str, eval_manifest: dict | None = None) -> dict | None:
    """One policy's eval figures, SFT's beside them, or None when the eval has none for it.
    With `eval_manifest` they name the eval build and the policy build it read, so that a
    card refuses figures of another build."""
    policies = (eval_metrics or {}).get("policies") or {}
    if not policies.get(policy):
        return None
    wins = (eval_metrics.get("win_rates") or {}).get(policy)
    if wins is None and policy == "rlhf":  # eval manifests before per-policy win rates
        wins = {"rm": eval_metrics.get("win_rate_rm"), "gold": eval_metrics.get("win_rate_gold")}
    criteria = eval_metrics.get("criteria") or {}
    beside = policy != "sft"  # SFT is the reference column, except on SFT's own card
    figures = {"policy": policy, "prompts": eval_metrics.get("prompts"), "answers_per_prompt": eval_metrics.get("samples_per_prompt", 1), "judge": eval_metrics.get("judge"), "scores": dict(policies[policy])}
    figures |= {"sft": policies.get("sft") if beside else None, "win_rate_rm": (wins or {}).get("rm"), "win_rate_gold": (wins or {}).get("gold")}
    figures |= {"criteria": criteria.get(policy), "sft_criteria": criteria.get("sft") if beside else None}
    figures["fallbacks"] = list(eval_metrics.get("fallbacks") or [])
    if eval_manifest is not None:
        figures["eval_build_id"] = eval_manifest.get("build_id")
        figures["policy_build_id"] = ((eval_manifest.get("parents") or {}).get(policy) or {}).get("build_id")
    return figures


def write(folder: Path, manifest: dict, evaluation: dict | None = None) -> None:
    """Write `folder/README.md` atomically: the old card or the new, and no temp file left."""
    folder = Path(folder)
    text = render(manifest, ancestors(manifest), evaluation, scorer=_is_scorer(folder))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".model-card-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a card is for everyone to read
        os.replace(tmp, folder / CARD)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    ckpt.fsync_dir(folder)


def _is_scorer(folder: Path) -> bool:
    """A one-output sequence classifier (the reward model) rather than a causal LM."""
    try:
        architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def render(manifest: dict, ancestors: dict[str, dict], evaluation: dict | None = None, scorer: bool = False) -> str:
    """The README.md text: YAML front matter for the Hub, then the card in markdown.
    `scorer`: the folder is a reward model (scored text in, one number out), not a policy."""
    stage, cfg, metrics = manifest.get("stage", "?"), manifest.get("config") or {}, manifest.get("metrics") or {}
    chain = {stage: manifest, **{k: v for k, v in ancestors.items() if k != stage}}
    base = chain.get("base") or {}
    source = str((base.get("metrics") or {}).get("source") or "")
    hub_model = source.removeprefix("hub:") if source.startswith("hub:") else None  # may end in @revision
    data = [(name, key, entry) for name, m in chain.items() for key, entry in (m.get("data") or {}).items() if isinstance(entry, dict)]
    front = {"library_name": "transformers", "pipeline_tag": "text-classification" if scorer else "text-generation", "tags": _tags(stage, cfg, metrics)}
    front |= {"base_model": hub_model.split("@")[0]} if hub_model else {}
    datasets = sorted({str(e.get("path")).split(":")[0] for _, key, e in data if e.get("hash") == "hub" and "data" in key.split(".")})
    front |= {"datasets": datasets} if datasets else {}
    out = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# `{stage}` {'reward model' if scorer else 'policy'}, made by rlhf-pipeline", "", _summary(manifest, stage, cfg, metrics)]
    if manifest.get("status", "complete") != "complete":
        out += ["", f"**Warning: this folder's manifest says `{manifest.get('status')}`, not complete.**"]
    out += ["", "## Lineage", "", _base_line(base, hub_model, chain), "", "| stage | build id | fingerprint | finished | read by |", "|---|---|---|---|---|"]
    for name, m in chain.items():
        used_by = ", ".join(child for child, cm in chain.items() if name in (cm.get("parents") or {})) or "-"
        when = m.get("problem") or (m.get("timings") or {}).get("finished") or "?"
        out.append(f"| {name} | `{m.get('build_id')}` | `{m.get('fingerprint')}` | {_cell(when)} | {used_by} |")
    out += ["", "Data, with the content hashes the fingerprints were built from:", "", "| stage | setting | path | content hash |", "|---|---|---|---|"]
    for name, key, entry in data:
        digest = "a Hub id (no content hash: the Hub may change it)" if entry.get("hash") == "hub" else f"`{entry.get('hash')}`"
        out.append(f"| {name} | `{key}` | `{_cell(entry.get('path'))}` | {digest} |")
    out += ["", "## Config (resolved)", "", "```yaml", yaml.safe_dump(cfg, sort_keys=False).rstrip(), "```", "", "## Training figures", ""]
    rows = [f"| {k} | {_cell(v if isinstance(v, str) else json.dumps(_rounded(v)))} |" for k, v in _flatten(metrics) if v is not None and k != "fallbacks"]
    out += ["| figure | value |", "|---|---|", *rows] if rows else ["None recorded."]
    if scorer:
        out += ["", "## Evaluation", "", "A reward model: its held-out pairwise accuracy is among the training figures above (eval_after), per pair in eval.json."]
    else:
        out += ["", "## Evaluation", "", *_evaluation(manifest, evaluation)]
    out += ["", "## How to load it", "", _LOAD_SCORER if scorer else _LOAD, "", "## Versions", ""]
    out.append(", ".join(f"{k} {v}" for k, v in (manifest.get("versions") or {}).items()) or "Not recorded.")
    taken = [f"- {name}: {f}" for name, m in chain.items() for f in m.get("fallbacks") or []] + [f"- eval: {f}" for f in (evaluation or {}).get("fallbacks") or []]
    out += ["", "## Fallbacks", "", *(taken or ["None: every stage above took the path it was asked for."])]
    return "\n".join(out) + "\n"


def _summary(manifest: dict, stage: str, cfg: dict, metrics: dict) -> str:
    timings, advantage = manifest.get("timings") or {}, cfg.get("advantage") or metrics.get("advantage")
    steps = metrics.get("steps", cfg.get("steps", cfg.get("max_steps")))
    how = [f"{ESTIMATORS.get(advantage, advantage)} (advantage estimator `{advantage}`)"] if advantage else []
    how += [f"method `{m}`"] if (m := cfg.get("method") or metrics.get("method")) else []
    how += [f"{steps} steps"] if steps is not None else []
    attempts = timings.get("attempts") or 1
    wall = f"{duration(timings.get('seconds'))} wall time" + (f" (of the last of {attempts} attempts)" if attempts > 1 else "")
    return (
        f"Stage `{stage}` ({WHAT.get(stage, 'a pipeline stage')}): {', '.join(how) or 'no method recorded'}; finished {timings.get('finished') or '?'} "
        f"after {wall} on {manifest.get('world_size', 1)} process(es). Build `{manifest.get('build_id')}`, fingerprint `{manifest.get('fingerprint')}`, seed {manifest.get('seed')}."
    )


_LOAD = """The folder is a plain Transformers checkpoint with its tokenizer and chat template
(LoRA weights, if any, are merged in):

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "."  # this folder, or the Hub repo it was uploaded to
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
messages = [{"role": "user", "content": "What is 12 + 30?"}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=64)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
```

Or in the project: `python -m pipeline generate <this folder> --prompt "What is 12 + 30?"`."""


_LOAD_SCORER = """The folder is a plain Transformers sequence classifier with one output, the reward, and
its tokenizer and chat template. A completion is scored as training saw it: the chat-templated
prompt with the generation prompt, the completion, then EOS; the reward is read at that EOS.

```python
from transformers import AutoModelForSequenceClassification, AutoTokenizer

path = "."  # this folder, or the Hub repo it was uploaded to
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, tokenize=False)
inputs = tokenizer(prompt + "12 + 30 = 42." + tokenizer.eos_token, return_tensors="pt", add_special_tokens=False)
print(model(**inputs).logits[0, 0].item())
```"""


def _evaluation(manifest: dict, figures: dict | None) -> list[str]:
    if not figures:
        return ["The eval stage has not run on this folder yet: no evaluation figures."]
    built = figures.get("policy_build_id")
    if built and built != manifest.get("build_id"):
        return [f"The eval stage has not run on this folder yet: its figures are for build `{built}` of this stage, not this one (`{manifest.get('build_id')}`)."]
    sft = figures.get("sft")
    judge = f", gold score by `{figures['judge']}`" if figures.get("judge") else ""
    build = f" (eval build `{figures['eval_build_id']}`)" if figures.get("eval_build_id") else ""
    each = "one sampled answer" if figures.get("answers_per_prompt", 1) == 1 else f"{figures['answers_per_prompt']} sampled answers"
    out = [f"From the eval stage{build}: {figures.get('prompts', '?')} held-out prompts, {each} each{judge}.", ""]
    out += ["| figure | this policy | sft |" if sft else "| figure | this policy |", "|---|---|---|" if sft else "|---|---|"]

    def row(label, value, ref, form):
        if value is not None or ref is not None:
            show = [form.format(v) if isinstance(v, (int, float)) else "-" for v in (value, ref)]
            out.append(f"| {label} | {show[0]} | {show[1]} |" if sft else f"| {label} | {show[0]} |")

    for key, label, form in EVAL_ROWS:
        row(label, figures["scores"].get(key), (sft or {}).get(key), form)
    row("win rate over SFT, by the RM", figures.get("win_rate_rm"), None, "{:.0%}")
    row("win rate over SFT, by the judge", figures.get("win_rate_gold"), None, "{:.0%}")
    for part, share in (figures.get("criteria") or {}).items():
        row(f"share: {part}", share, (figures.get("sft_criteria") or {}).get(part), "{:.2f}")
    return out


def _tags(stage: str, cfg: dict, metrics: dict) -> list[str]:
    named = [cfg.get(k) or metrics.get(k) for k in ("method", "advantage")]
    tags = ["rlhf-pipeline", stage, *(t for t in named if isinstance(t, str) and t != stage)]
    return tags + ["ppo"] if "gae" in tags else tags


def _base_line(base: dict, hub_model: str | None, chain: dict) -> str:
    broken = [name for name, m in chain.items() if m.get("problem")]
    if not base:
        return f"Base model: unknown, the lineage stops at {', '.join(broken)} (below)." if broken else "Base model: no `base` stage upstream of this one."
    if base.get("problem"):
        return f"Base model: unknown, the base stage's manifest is {base['problem']}."
    m, model = base.get("metrics") or {}, (base.get("config") or {}).get("model")
    size = f"{m['architecture']}, {m['parameters']:,} parameters" if m.get("architecture") and m.get("parameters") else "size not recorded"
    where = f"the Hub model `{hub_model}`" if hub_model else f"`{model}`, a local file or folder, not a Hub id (so the front matter names no base_model); read from `{m.get('source')}`"
    return f"Base model: {where} ({size})."


def _flatten(value: dict, prefix: str = ""):
    for key, v in value.items():
        if isinstance(v, dict) and v:
            yield from _flatten(v, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", v


def _rounded(v):
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: _rounded(x) for k, x in v.items()}
    return [_rounded(x) for x in v] if isinstance(v, list | tuple) else v


def _cell(v) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")
