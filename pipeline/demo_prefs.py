"""The demo task's prompt sets and its rankings, made as InstructGPT made them.

Prompts: one random stream, outside the shipped demo_sft prompts, is cut into three
disjoint sets, so SFT, reward modelling, PPO and evaluation never share a prompt:

    rank    prompts whose sampled completions get ranked (the reward model's data)
    rl      PPO rollout prompts            configs/data/demo_prompts.jsonl
    eval    held-out evaluation prompts    configs/data/demo_eval.jsonl

Rankings: `pipeline.demo_rankings` samples K completions per rank prompt from the
SFT model and `rank` below orders them with the gold judge (`pipeline.demo_judge`)
plus rater noise, writing configs/data/demo_rm.jsonl. The solvers here recover each
prompt's answer from its text, for the judge.

The two prompt files rebuild byte for byte with

    python -m pipeline.demo_prefs --seed 0

(rebuild them whenever demo_sft changes). Standard library only, like demo_data.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import string
from collections.abc import Callable, Iterable
from pathlib import Path

from pipeline import demo_data as dd

DEFAULT_SEED = 0
DEFAULT_PROMPTS_PATH = "configs/data/demo_prompts.jsonl"
DEFAULT_EVAL_PATH = "configs/data/demo_eval.jsonl"
SPLITS = {"rank": 400, "rl": 256, "eval": 64}  # sizes, in drawing order

# ---------------------------------------------------------------------------
# Solvers: recover the answer from the prompt text by inverting demo_data's own
# prompt templates. Each returns (answer as it appears in the friendly response,
# short answer for the curt/padded variants, plausible wrong answers).
# ---------------------------------------------------------------------------


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>.+?)")
    return re.compile("".join(parts))


def _match(prompt: str, templates: Iterable[str]) -> dict | None:
    for template in templates:
        m = _template_regex(template).fullmatch(prompt)
        if m:
            return m.groupdict()
    return None


def _need(prompt: str, templates: Iterable[str]) -> dict:
    fields = _match(prompt, templates)
    if fields is None:
        raise ValueError(f"no demo_data template matches {prompt!r}")
    return fields


def _arithmetic(prompt: str) -> tuple[str, str, list[str]]:
    if f := _match(prompt, dd._ADD_PROMPTS):
        c = int(f["a"]) + int(f["b"])
    else:
        f = _need(prompt, dd._SUB_PROMPTS)
        c = int(f["a"]) - int(f["b"])
    # Near misses: a slip of one or two, or a wrong carry.
    return str(c), str(c), [str(c + d) for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0]


def _opposites(prompt: str) -> tuple[str, str, list[str]]:
    w = _need(prompt, dd._OPPOSITE_PROMPTS)["w"]
    o = dd._OPPOSITE_OF[w]
    return o, o, [x for x in dd._OPPOSITE_WORDS if x not in (w, o)]


def _letter_count(prompt: str) -> tuple[str, str, list[str]]:
    n = len(_need(prompt, dd._COUNT_PROMPTS)["w"])
    return str(n), f"{n} letters", [str(n + d) for d in (-2, -1, 1, 2)]  # words have >= 3 letters


def _weekdays(prompt: str) -> tuple[str, str, list[str]]:
    f = _match(prompt, dd._AFTER_PROMPTS)
    step = 1 if f else -1
    i = dd.WEEKDAYS.index((f or _need(prompt, dd._BEFORE_PROMPTS))["d"])
    x = dd.WEEKDAYS[(i + step) % 7]
    # The classic mistakes: the wrong direction, or one day too far.
    return x, x, [dd.WEEKDAYS[(i - step) % 7], dd.WEEKDAYS[(i + 2 * step) % 7]]


def _sorting(prompt: str) -> tuple[str, str, list[str]]:
    f = _match(prompt, dd._DESC_PROMPTS)
    descending = f is not None
    xs = [int(x) for x in (f or _need(prompt, dd._ASC_PROMPTS))["xs"].split(", ")]
    ys = sorted(xs, reverse=descending)
    wrongs = [ys[::-1]] + [ys[:k] + [ys[k + 1], ys[k]] + ys[k + 2:] for k in range(len(ys) - 1)]
    join = ", ".join
    return join(map(str, ys)), join(map(str, ys)), [join(map(str, w)) for w in wrongs]


def _unit_conversion(prompt: str) -> tuple[str, str, list[str]]:
    f = _need(prompt, dd._UNIT_PROMPTS)
    factor = {(big, small): k for big, small, k in dd.UNITS}[(f["big"], f["small"])]
    m = int(f["n"]) * factor
    return str(m), f"{m} {f['small']}", [str(m - factor), str(m + factor)]  # off by one unit


def _colour_mixing(prompt: str) -> tuple[str, str, list[str]]:
    f = _need(prompt, dd._COLOUR_PROMPTS)
    c = next(c for a, b, c in dd.COLOUR_MIXES if {a, b} == {f["a"], f["b"]})
    return c, c, [x for _, _, x in dd.COLOUR_MIXES if x != c]


def _backwards(prompt: str) -> tuple[str, str, list[str]]:
    w = _need(prompt, dd._BACKWARDS_PROMPTS)["w"]
    r = w[::-1]
    # Not reversed at all, or two neighbouring letters slipped.
    swaps = [r[:k] + r[k + 1] + r[k] + r[k + 2:] for k in range(len(r) - 1) if r[k] != r[k + 1]]
    return r, r, [x for x in [w] + swaps if x != r]


def _capitals(prompt: str) -> tuple[str, str, list[str]]:
    p = _need(prompt, dd._CAPITALS_PROMPTS)["p"]
    u = p.upper()
    half_done = [p.capitalize(), " ".join(word.capitalize() for word in p.split())]
    return u, u, [x for x in half_done if x != u]


def _plurals(prompt: str) -> tuple[str, str, list[str]]:
    s = _need(prompt, dd._PLURAL_PROMPTS)["s"]
    p = dict(dd.PLURALS)[s]
    # Over-regularised or unchanged forms: "childs", "boxs", "cates", "cat".
    return p, p, [x for x in (s + "s", s + "es", s) if x != p]


SOLVERS = {
    "arithmetic": _arithmetic, "opposites": _opposites, "letter_count": _letter_count,
    "weekdays": _weekdays, "sorting": _sorting, "unit_conversion": _unit_conversion,
    "colour_mixing": _colour_mixing, "backwards": _backwards, "capitals": _capitals,
    "plurals": _plurals,
}
assert tuple(SOLVERS) == dd.TASKS, "every demo family needs a solver"


# ---------------------------------------------------------------------------
# Prompt sets and rankings.
# ---------------------------------------------------------------------------


@functools.cache
def _sft_prompts() -> dict[str, frozenset[str]]:
    rows = dd.generate(dd.DEFAULT_N, dd.DEFAULT_SEED)
    return {t: frozenset(r["prompt"] for r in rows if r["task"] == t) for t in dd.TASKS}


def _draw(n: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """n distinct (task, prompt, friendly response), none of them a demo_sft prompt.

    Round-robin like demo_data.generate, but a family leaves the rotation once its
    prompts that demo_sft does not use run out, so the sets stay disjoint.
    """
    avoid = _sft_prompts()
    left = {t: cap - len(avoid[t]) for t, (_, cap) in dd.FAMILIES.items()}
    if n > sum(left.values()):
        raise ValueError(f"can make at most {sum(left.values())} prompts outside demo_sft, asked for {n}")
    seen = set().union(*avoid.values())
    out: list[tuple[str, str, str]] = []
    active = [t for t in dd.TASKS if left[t] > 0]
    turn = 0
    while len(out) < n:
        task = active[turn % len(active)]
        draw = dd.FAMILIES[task][0]
        while True:  # ends: left[task] > 0 means an unseen prompt exists
            prompt, response = draw(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        out.append((task, prompt, response))
        left[task] -= 1
        if left[task] == 0:
            active.remove(task)
        else:
            turn += 1
    rng.shuffle(out)  # any prefix is a mix of families
    return out


def split_prompts(seed: int = DEFAULT_SEED, sizes: dict[str, int] = SPLITS) -> dict[str, list[dict]]:
    """Disjoint prompt sets {"rank", "rl", "eval"} of rows {"prompt", "task"}."""
    rng = random.Random(f"demo_prefs/prompts/{seed}")
    drawn = _draw(sum(sizes.values()), rng)
    out, start = {}, 0
    for name, n in sizes.items():
        out[name] = [{"prompt": prompt, "task": task} for task, prompt, _ in drawn[start : start + n]]
        start += n
    return out


def rank(prompt: str, samples: Iterable[str], judge: Callable[[str, str], float], noise: float, rng: random.Random) -> tuple[list[str], dict]:
    """Order distinct samples best first, as a rater who follows `judge` with some noise.

    Samples the judge scores equally are one level: the rater has no preference
    among them, so one of them (at random) stands for the level. Each level's score
    gets Gaussian noise of std `noise` before sorting, so close calls flip now and
    then, as between human labellers. Returns (completions best first, counts); fewer
    than two levels means nothing to rank and an empty list.
    """
    by_level: dict[float, list[str]] = {}
    for text in dict.fromkeys(s.strip() for s in samples):  # distinct, in order
        if text:
            by_level.setdefault(judge(prompt, text), []).append(text)
    picked = [(gold + rng.gauss(0.0, noise), gold, rng.choice(texts)) for gold, texts in sorted(by_level.items())]
    picked.sort(key=lambda t: -t[0])
    golds = [g for _, g, _ in picked]
    flips = sum(golds[i] < golds[j] for i in range(len(golds)) for j in range(i + 1, len(golds)))
    pairs = len(golds) * (len(golds) - 1) // 2
    return ([t for _, _, t in picked] if len(picked) >= 2 else []), {"pairs": pairs, "flipped": flips}


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, keys in the rows' own order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo RL and evaluation prompt sets as JSONL.")
    parser.add_argument("--prompts-out", default=DEFAULT_PROMPTS_PATH, help=f"RL prompts (default {DEFAULT_PROMPTS_PATH})")
    parser.add_argument("--eval-out", default=DEFAULT_EVAL_PATH, help=f"held-out prompts (default {DEFAULT_EVAL_PATH})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    sets = split_prompts(args.seed)
    write_jsonl(sets["rl"], args.prompts_out)
    write_jsonl(sets["eval"], args.eval_out)
    print(f"wrote {len(sets['rl'])} prompts to {args.prompts_out} and {len(sets['eval'])} to {args.eval_out}")


if __name__ == "__main__":
    main()
