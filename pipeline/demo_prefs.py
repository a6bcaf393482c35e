"""Generator for the embedded demo reward-model rankings and RL prompt set.

It reuses the task families of `pipeline.demo_data` (same prompts, same friendly
answers) and adds, per prompt, worse completions in a fixed order of preference:

    good            correct, friendly and concise: a demo_sft-style answer
    curt_or_padded  correct, but a bare answer or buried in rambling filler
    wrong           the friendly answer with a plausibly wrong value swapped in
    unhelpful       a refusal or an off-topic remark

A row with K < 4 keeps an order-preserving subset of these kinds whose best is a
correct answer, so completions[0] is always right. Prompts come from random streams
of their own and never repeat a shipped demo_sft prompt (so rebuild these files
whenever demo_sft changes). All text was written for this project. Both shipped
files rebuild byte for byte with:

    python -m pipeline.demo_prefs --rm-out configs/data/demo_rm.jsonl --prompts-out configs/data/demo_prompts.jsonl --seed 0

Standard library only, like demo_data.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import re
import string
from collections.abc import Iterable
from pathlib import Path

from pipeline import demo_data as dd

DEFAULT_SEED = 0
DEFAULT_RM_PATH = "configs/data/demo_rm.jsonl"
DEFAULT_PROMPTS_PATH = "configs/data/demo_prompts.jsonl"
RM_ROWS = 600
PROMPT_ROWS = 256

KINDS = ("good", "curt_or_padded", "wrong", "unhelpful")  # best first
# Cycled over the (already shuffled) rows: exactly 40% K=4, 30% K=3, 30% K=2, so
# every K has enough rows for a per-K accuracy to mean something.
K_CYCLE = (4, 4, 4, 4, 3, 3, 3, 2, 2, 2)

UNHELPFUL = (
    "Sorry, I can't help with that.",
    "I'd rather not answer that one.",
    "That is not something I can talk about, I'm afraid.",
    "Why do you want to know?",
    "I don't know. Maybe ask someone else?",
    "Let's talk about something else instead. Do you like trains?",
    "Good question! Anyway, I had soup for lunch today.",
    "Hmm, I will get back to you on that one later.",
    "You should be able to work that out on your own.",
    "Did you know that snails can sleep for a very long time?",
)

# Filler for the padded variant. No digits and no double quotes, so the answer is
# the only number or quoted text in it (the tests rely on that).
_OPENERS = (
    "Well, that is a really interesting question, and I have to say that I have thought about questions like this one many times before.",
    "Okay, so, let me take a moment here, because there is honestly quite a lot that could be said about something like this.",
    "Hmm, right, before I get to it I should mention that this kind of thing comes up surprisingly often, in all sorts of situations.",
)
_MIDDLES = (
    "People sometimes rush these things, but it is usually better to go slowly and think about every little step along the way.",
    "There are a few different ways of looking at it, and each of them has its own small advantages and disadvantages.",
    "It reminds me of how much there is to learn about even the simplest things, which is something I find quite fascinating.",
)
_LEADS = (
    "Anyway, after all of that, the answer is {a}.",
    "So, putting it all together, I would say it is {a}.",
    "In the end, it comes out as {a}.",
)
_CLOSERS = (
    "I hope that long explanation was useful, and do let me know if you would like me to go over any of it again!",
    "Of course, there is always more that could be said, but I think that covers the main points for now.",
)

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


def _swap_answer(response: str, answer: str, wrong: str) -> str:
    # Whole tokens only ("5" is not inside "15"); and every demo response template
    # puts the answer last when it appears twice ("10 - 5 = 5", "One sheep, two
    # sheep"), so the last occurrence is the answer.
    hits = list(re.finditer(rf"(?<!\w){re.escape(answer)}(?!\w)", response))
    if not hits:
        raise ValueError(f"answer {answer!r} not found in {response!r}")
    last = hits[-1]
    return response[:last.start()] + wrong + response[last.end():]


def _padded(short: str, rng: random.Random) -> str:
    return " ".join((rng.choice(_OPENERS), rng.choice(_MIDDLES), rng.choice(_LEADS).format(a=short), rng.choice(_CLOSERS)))


def completions_by_kind(task: str, prompt: str, response: str, rng: random.Random) -> dict[str, str]:
    """All four kinds for one prompt; `response` is demo_data's friendly answer."""
    answer, short, wrongs = SOLVERS[task](prompt)
    return {
        "good": response,
        "curt_or_padded": f"{short}." if rng.random() < 0.5 else _padded(short, rng),
        "wrong": _swap_answer(response, answer, rng.choice(wrongs)),
        "unhelpful": rng.choice(UNHELPFUL),
    }


# ---------------------------------------------------------------------------
# Prompt drawing and the two files.
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


def _pick_kinds(k: int, rng: random.Random) -> list[str]:
    # Any order-preserving subset whose best is a correct answer, so the first
    # completion of every row is a usable "chosen" one.
    while True:
        picked = sorted(rng.sample(range(len(KINDS)), k))
        if KINDS[picked[0]] in ("good", "curt_or_padded"):
            return [KINDS[j] for j in picked]


def generate_rm(n: int = RM_ROWS, seed: int = DEFAULT_SEED, with_kinds: bool = False) -> list[dict]:
    """Rows {"prompt", "completions": [best, ..., worst], "task"}; `with_kinds` adds
    "kinds" naming each completion's kind (for tests and analysis, not the file)."""
    rng = random.Random(f"demo_prefs/rm/{seed}")  # a stream of its own, unlike demo_sft's Random(seed)
    rows = []
    for i, (task, prompt, response) in enumerate(_draw(n, rng)):
        by_kind = completions_by_kind(task, prompt, response, rng)
        kinds = _pick_kinds(K_CYCLE[i % len(K_CYCLE)], rng)
        completions = [by_kind[k] for k in kinds]
        if len(set(completions)) != len(completions):
            raise AssertionError(f"duplicate completions for {prompt!r}: {completions}")
        row = {"prompt": prompt, "completions": completions, "task": task}
        if with_kinds:
            row["kinds"] = kinds
        rows.append(row)
    return rows


def generate_prompts(n: int = PROMPT_ROWS, seed: int = DEFAULT_SEED) -> list[dict]:
    """Rows {"prompt", "task"}: distinct prompts for RL rollouts."""
    rng = random.Random(f"demo_prefs/prompts/{seed}")
    return [{"prompt": prompt, "task": task} for task, prompt, _ in _draw(n, rng)]


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, keys in the rows' own order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo reward-model rankings and RL prompts as JSONL.")
    parser.add_argument("--rm-out", default=DEFAULT_RM_PATH, help=f"rankings file (default {DEFAULT_RM_PATH})")
    parser.add_argument("--prompts-out", default=DEFAULT_PROMPTS_PATH, help=f"prompts file (default {DEFAULT_PROMPTS_PATH})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    rm_rows, prompt_rows = generate_rm(RM_ROWS, args.seed), generate_prompts(PROMPT_ROWS, args.seed)
    write_jsonl(rm_rows, args.rm_out)
    write_jsonl(prompt_rows, args.prompts_out)
    print(f"wrote {len(rm_rows)} rankings to {args.rm_out} and {len(prompt_rows)} prompts to {args.prompts_out}")


if __name__ == "__main__":
    main()
