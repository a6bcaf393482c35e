"""The demo task families: one object per family, and the table `FAMILIES`.

A family (see `demo.family.Family`) holds its prompt and response templates,
`sample(rng)` to draw one (prompt, response) pair, `solve(prompt)` to recover the
answer from a prompt's text by matching its own templates, and `capacity`, its
number of distinct prompts. No two families render the same prompt, so capacities
add up.

Reproducibility: every shipped demo file is a function of the seeds, FAMILIES' order
and each sampler's exact sequence of rng calls. Changing any of them changes the
files, and the tests that rebuild them will say so.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator, Mapping
from typing import ClassVar

from demo.family import Family, Solution
from demo.words import (
    COLOUR_MIXES,
    NUMBERS,
    OPPOSITE_OF,
    OPPOSITE_WORDS,
    PHRASES,
    PLURALS,
    SORT_POOL,
    SORT_SIZES,
    UNIT_AMOUNTS,
    UNITS,
    WEEKDAYS,
    WORDS,
)


class Arithmetic(Family):
    name = "arithmetic"
    add_prompts = (
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "What do you get when you add {a} to {b}?",
        "Calculate {a} plus {b}.",
        "What is the sum of {a} and {b}?",
    )
    sub_prompts = (
        "What is {a} - {b}?",
        "Compute {a} minus {b}.",
        "Subtract {b} from {a}.",
        "What is {a} take away {b}?",
        "What is the difference when {b} is subtracted from {a}?",
    )
    prompts = add_prompts + sub_prompts
    responses = (
        "Sure! {a} {op} {b} = {c}.",
        "{a} {op} {b} is {c}.",
        "That's easy: {a} {op} {b} = {c}.",
        "The answer is {c}.",
    )
    # Subtraction draws b <= a: for each a, a - NUMBERS.start + 1 choices of b.
    capacity = len(add_prompts) * len(NUMBERS) ** 2 + len(sub_prompts) * len(NUMBERS) * (len(NUMBERS) + 1) // 2

    def sample(self, rng):
        if rng.random() < 0.5:
            a, b = rng.choice(NUMBERS), rng.choice(NUMBERS)
            prompt, op, c = rng.choice(self.add_prompts), "+", a + b
        else:
            # a >= b keeps answers non-negative: the demo is about format, not negatives.
            a = rng.choice(NUMBERS)
            b = rng.randint(NUMBERS.start, a)
            prompt, op, c = rng.choice(self.sub_prompts), "-", a - b
        return prompt.format(a=a, b=b), rng.choice(self.responses).format(a=a, b=b, op=op, c=c)

    def solve(self, prompt):
        if f := self.match(prompt, self.add_prompts):
            c = int(f["a"]) + int(f["b"])
        else:
            f = self.fields(prompt, self.sub_prompts)
            c = int(f["a"]) - int(f["b"])
        # Near misses: a slip of one or two, or a wrong carry.
        return Solution.of(str(c), (str(c + d) for d in (-10, -2, -1, 1, 2, 10) if c + d >= 0))


class Opposites(Family):
    name = "opposites"
    prompts = (
        'What is the opposite of "{w}"?',
        'Give me the opposite of the word "{w}".',
        'What word means the opposite of "{w}"?',
        'Name the antonym of "{w}".',
    )
    responses = (
        'Happy to help: the opposite of "{w}" is "{o}".',
        'The opposite of "{w}" is "{o}".',
        'Sure! "{o}" is the opposite of "{w}".',
    )
    capacity = len(prompts) * len(OPPOSITE_WORDS)

    def sample(self, rng):
        w = rng.choice(OPPOSITE_WORDS)
        o = OPPOSITE_OF[w]
        return rng.choice(self.prompts).format(w=w), rng.choice(self.responses).format(w=w, o=o)

    def solve(self, prompt):
        w = self.fields(prompt)["w"]
        o = self.lookup(OPPOSITE_OF, w, prompt)
        return Solution.of(o, (x for x in OPPOSITE_WORDS if x != w))


class LetterCount(Family):
    name = "letter_count"
    prompts = (
        'How many letters are in the word "{w}"?',
        'Count the letters in "{w}".',
        'How many letters does "{w}" have?',
        'How long is the word "{w}", in letters?',
    )
    responses = (
        'The word "{w}" has {n} letters.',
        'There are {n} letters in "{w}".',
        'Sure! "{w}" is spelled with {n} letters.',
    )
    capacity = len(prompts) * len(WORDS)

    def sample(self, rng):
        w = rng.choice(WORDS)
        return rng.choice(self.prompts).format(w=w), rng.choice(self.responses).format(w=w, n=len(w))

    def solve(self, prompt):
        n = len(self.fields(prompt)["w"])
        return Solution.of(str(n), (str(n + d) for d in (-2, -1, 1, 2) if n + d > 0))


class Weekdays(Family):
    name = "weekdays"
    after_prompts = (
        "What day comes after {d}?",
        "Which day follows {d}?",
        "If today is {d}, what day is tomorrow?",
        "What is the day after {d}?",
        "Name the weekday that comes right after {d}.",
    )
    before_prompts = (
        "What day comes before {d}?",
        "Which day is just before {d}?",
        "If today is {d}, what day was yesterday?",
        "What is the day before {d}?",
        "Name the weekday that comes right before {d}.",
    )
    prompts = after_prompts + before_prompts
    responses = (
        "The day {rel} {d} is {x}.",
        "Sure! {x} comes right {rel} {d}.",
        "It's {x}.",
    )
    capacity = len(prompts) * len(WEEKDAYS)

    def sample(self, rng):
        i = rng.randrange(len(WEEKDAYS))
        if rng.random() < 0.5:
            templates, rel, x = self.after_prompts, "after", WEEKDAYS[(i + 1) % 7]
        else:
            templates, rel, x = self.before_prompts, "before", WEEKDAYS[(i - 1) % 7]
        d = WEEKDAYS[i]
        return rng.choice(templates).format(d=d), rng.choice(self.responses).format(rel=rel, d=d, x=x)

    def solve(self, prompt):
        f = self.match(prompt, self.after_prompts)
        step = 1 if f else -1
        d = (f or self.fields(prompt, self.before_prompts))["d"]
        if d not in WEEKDAYS:
            raise ValueError(f"{d!r} in {prompt!r} is not a weekday")
        i = WEEKDAYS.index(d)
        # The classic mistakes: the wrong direction, or one day too far.
        return Solution.of(WEEKDAYS[(i + step) % 7], (WEEKDAYS[(i - step) % 7], WEEKDAYS[(i + 2 * step) % 7]))


class Sorting(Family):
    name = "sorting"
    ascending_prompts = (
        "Sort these numbers in ascending order: {xs}.",
        "Put these in order from smallest to largest: {xs}.",
        "Arrange from lowest to highest: {xs}.",
        "Order these numbers from small to big: {xs}.",
    )
    descending_prompts = (
        "Sort these numbers in descending order: {xs}.",
        "Put these in order from largest to smallest: {xs}.",
        "Arrange from highest to lowest: {xs}.",
        "Order these numbers from big to small: {xs}.",
    )
    prompts = ascending_prompts + descending_prompts
    responses = (
        "Here they are from {how}: {ys}.",
        "Sure! Sorted from {how}: {ys}.",
        "In order from {how}: {ys}.",
    )
    # The prompt shows the numbers in drawn order, so every arrangement is its own prompt.
    capacity = len(prompts) * sum(math.perm(len(SORT_POOL), k) for k in SORT_SIZES)

    def sample(self, rng):
        xs = rng.sample(SORT_POOL, rng.choice(SORT_SIZES))
        descending = rng.random() < 0.5
        templates = self.descending_prompts if descending else self.ascending_prompts
        how = "largest to smallest" if descending else "smallest to largest"
        ys = sorted(xs, reverse=descending)
        prompt = rng.choice(templates).format(xs=", ".join(map(str, xs)))
        return prompt, rng.choice(self.responses).format(how=how, ys=", ".join(map(str, ys)))

    def solve(self, prompt):
        f = self.match(prompt, self.descending_prompts)
        descending = f is not None
        xs = [int(x) for x in (f or self.fields(prompt, self.ascending_prompts))["xs"].split(", ")]
        ys = sorted(xs, reverse=descending)
        # The wrong direction, or two neighbours left swapped.
        wrongs = [ys[::-1]] + [ys[:k] + [ys[k + 1], ys[k]] + ys[k + 2 :] for k in range(len(ys) - 1)]
        return Solution.of(", ".join(map(str, ys)), (", ".join(map(str, w)) for w in wrongs))


class UnitConversion(Family):
    name = "unit_conversion"
    prompts = (
        "How many {small} are in {n} {big}?",
        "Convert {n} {big} to {small}.",
        "{n} {big} is how many {small}?",
        "How many {small} make up {n} {big}?",
    )
    responses = (
        "{n} {big} is {m} {small}.",
        "There are {m} {small} in {n} {big}.",
        "Sure! That's {m} {small}.",
    )
    capacity = len(prompts) * len(UNITS) * len(UNIT_AMOUNTS)
    factors: ClassVar[dict[tuple[str, str], int]] = {(big, small): k for big, small, k in UNITS}

    def sample(self, rng):
        big, small, factor = rng.choice(UNITS)
        n = rng.choice(UNIT_AMOUNTS)
        prompt = rng.choice(self.prompts).format(n=n, big=big, small=small)
        return prompt, rng.choice(self.responses).format(n=n, big=big, small=small, m=n * factor)

    def solve(self, prompt):
        f = self.fields(prompt)
        factor = self.lookup(self.factors, (f["big"], f["small"]), prompt)
        m = int(f["n"]) * factor
        return Solution.of(str(m), (str(m - factor), str(m + factor)))  # off by one unit


class ColourMixing(Family):
    name = "colour_mixing"
    prompts = (
        "What colour do you get when you mix {a} and {b}?",
        "If I mix {a} paint with {b} paint, what colour do I get?",
        "What do {a} and {b} make when mixed?",
        "What colour is {a} plus {b}?",
        "Which colour comes from mixing {a} and {b}?",
        "I blend {a} and {b} paint together. What colour is it?",
    )
    responses = (
        "Mixing {a} and {b} gives you {c}.",
        "Sure! {A} and {b} make {c}.",
        "You get {c} when you mix {a} and {b}.",
    )
    capacity = len(prompts) * 2 * len(COLOUR_MIXES)  # 2: either colour may come first
    results: ClassVar[dict[frozenset[str], str]] = {frozenset((a, b)): c for a, b, c in COLOUR_MIXES}

    def sample(self, rng):
        a, b, c = rng.choice(COLOUR_MIXES)
        if rng.random() < 0.5:
            a, b = b, a  # mixing is symmetric; teach both orders
        # The response is drawn before the prompt template: the shipped files depend on it.
        response = rng.choice(self.responses).format(a=a, A=a.capitalize(), b=b, c=c)
        return rng.choice(self.prompts).format(a=a, b=b), response

    def solve(self, prompt):
        f = self.fields(prompt)
        c = self.lookup(self.results, frozenset((f["a"], f["b"])), prompt)
        return Solution.of(c, (x for _, _, x in COLOUR_MIXES))


class Backwards(Family):
    name = "backwards"
    prompts = (
        'Spell "{w}" backwards.',
        'What is "{w}" written backwards?',
        'Reverse the letters of "{w}".',
        'Can you write the word "{w}" in reverse?',
    )
    responses = (
        '"{w}" backwards is "{r}".',
        'Sure! Reversed, it reads "{r}".',
        'Here you go: "{r}".',
    )
    capacity = len(prompts) * len(WORDS)

    def sample(self, rng):
        w = rng.choice(WORDS)
        return rng.choice(self.prompts).format(w=w), rng.choice(self.responses).format(w=w, r=w[::-1])

    def solve(self, prompt):
        w = self.fields(prompt)["w"]
        r = w[::-1]
        # Not reversed at all, or two neighbouring letters slipped.
        swaps = (r[:k] + r[k + 1] + r[k] + r[k + 2 :] for k in range(len(r) - 1))
        return Solution.of(r, [w, *swaps])


class Capitals(Family):
    name = "capitals"
    prompts = (
        'Write "{p}" in capital letters.',
        'Turn "{p}" into all caps.',
        'Please put "{p}" in upper case.',
        'How do you write "{p}" in capital letters?',
    )
    responses = (
        'Here it is in capitals: "{u}".',
        'Sure! Here you go: "{u}".',
        'In capital letters: "{u}".',
    )
    capacity = len(prompts) * len(PHRASES)

    def sample(self, rng):
        p = rng.choice(PHRASES)
        return rng.choice(self.prompts).format(p=p), rng.choice(self.responses).format(u=p.upper())

    def solve(self, prompt):
        p = self.fields(prompt)["p"]
        # Half done: only the first letter, or every word's first letter.
        return Solution.of(p.upper(), (p.capitalize(), " ".join(word.capitalize() for word in p.split())))


class Plurals(Family):
    name = "plurals"
    prompts = (
        'What is the plural of "{s}"?',
        'Write the plural form of "{s}".',
        'If there is more than one "{s}", what word do you use?',
        'Give me the plural of the noun "{s}".',
    )
    responses = (
        'The plural of "{s}" is "{p}".',
        "Sure! One {s}, two {p}.",
        'It\'s "{p}".',
    )
    capacity = len(prompts) * len(PLURALS)
    plural_of: ClassVar[dict[str, str]] = dict(PLURALS)

    def sample(self, rng):
        s, p = rng.choice(PLURALS)
        return rng.choice(self.prompts).format(s=s), rng.choice(self.responses).format(s=s, p=p)

    def solve(self, prompt):
        s = self.fields(prompt)["s"]
        # Over-regularised or unchanged forms: "childs", "boxs", "cates", "cat".
        return Solution.of(self.lookup(self.plural_of, s, prompt), (s + "s", s + "es", s))


# name -> family. The order is the round-robin order of `draw_rows`, so it is part of
# what makes the shipped files reproducible: a new family goes at the end.
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Arithmetic(), Opposites(), LetterCount(), Weekdays(), Sorting(),
        UnitConversion(), ColourMixing(), Backwards(), Capitals(), Plurals(),
    )
}


def draw_rows(rng: random.Random, quotas: Mapping[str, int], avoid: Iterable[str] = ()) -> Iterator[tuple[str, str, str]]:
    """Rows (family name, prompt, response) with distinct prompts, none in `avoid`.

    Families take turns in FAMILIES order, so any count of rows stays balanced; a
    family leaves the rotation after quotas[name] rows and the stream ends when all
    have. Rows are drawn lazily, so a caller may use `rng` between them. A quota must
    not exceed the family's capacity minus its prompts in `avoid`, or this never ends.
    """
    left = {name: quotas.get(name, 0) for name in FAMILIES}
    seen = set(avoid)
    active = [name for name in FAMILIES if left[name] > 0]
    turn = 0
    while active:
        name = active[turn % len(active)]
        while True:  # ends: a quota left means an unseen prompt exists
            prompt, response = FAMILIES[name].sample(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        yield name, prompt, response
        left[name] -= 1
        if left[name] == 0:
            active.remove(name)  # the next family now sits at index `turn`
        else:
            turn += 1
