"""Generator for the embedded demo supervised-fine-tuning set.

The demo task is a tiny "helpful, correct, concise and friendly assistant": short
questions whose answers a program can check (arithmetic, opposites, letter counts,
...). The responses teach the format without being the best a rater could ask for:
some open warmly ("Sure!"), about a quarter end with a friendly closing line, few do
both, which is the room PPO has to improve on (see `pipeline.demo_judge`). Every template and word list below was written for this project, so the
shipped `configs/data/demo_sft.jsonl` carries no third-party text, and it can be
rebuilt byte for byte with:

    python -m pipeline.demo_data --out configs/data/demo_sft.jsonl --n 480 --seed 0

Standard library only: the generator must run before (and without) any ML stack.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Iterable
from pathlib import Path

DEFAULT_N = 480
DEFAULT_SEED = 0
DEFAULT_PATH = "configs/data/demo_sft.jsonl"

# ---------------------------------------------------------------------------
# Hand-written word lists. Each list has no repeated entries, so a prompt is
# determined by (template, parameters) and family capacities can be counted.
# ---------------------------------------------------------------------------

# Each word appears once in the whole table, so "the opposite of X" has one answer.
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("happy", "sad"), ("fast", "slow"),
    ("light", "dark"), ("up", "down"), ("open", "closed"), ("early", "late"),
    ("full", "empty"), ("tall", "short"), ("old", "young"), ("hard", "soft"),
    ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"),
    ("clean", "dirty"), ("thick", "thin"), ("win", "lose"), ("push", "pull"),
    ("buy", "sell"), ("give", "take"), ("first", "last"), ("inside", "outside"),
    ("above", "below"), ("always", "never"), ("true", "false"), ("begin", "end"),
    ("day", "night"), ("left", "right"), ("north", "south"), ("east", "west"),
    ("sweet", "sour"), ("safe", "dangerous"), ("easy", "difficult"),
    ("cheap", "expensive"), ("friend", "enemy"), ("question", "answer"),
    ("arrive", "leave"), ("asleep", "awake"), ("remember", "forget"),
    ("wide", "narrow"), ("smooth", "rough"), ("near", "far"),
    ("accept", "refuse"), ("increase", "decrease"), ("entrance", "exit"),
)

# Lowercase letters only, so "number of letters" is simply len(word).
WORDS = (
    "cat", "sun", "moon", "star", "book", "tree", "fish", "bird", "lamp", "nest",
    "cloud", "dream", "flame", "grape", "heart", "honey", "lemon", "mango",
    "ocean", "piano", "quilt", "river", "tiger", "zebra", "apple", "chair",
    "garden", "window", "pencil", "rabbit", "orange", "planet", "bridge",
    "castle", "dragon", "forest", "guitar", "island", "jacket", "kitten",
    "ladder", "market", "needle", "pillow", "rocket", "silver", "tomato",
    "turtle", "valley", "wizard", "yellow", "button", "candle", "dinner",
    "engine", "hammer", "insect", "jungle", "kettle", "magnet", "puzzle",
    "sunset", "teacup", "marble", "whistle", "blanket", "library", "penguin",
    "rainbow", "umbrella", "mountain", "elephant", "sandwich", "butterfly",
)

# Short, plain phrases for the capital-letters family.
PHRASES = (
    "good morning", "happy birthday", "see you soon", "thank you very much",
    "welcome home", "have a nice day", "the sky is blue", "keep it simple",
    "well done", "time for lunch", "open the door", "let's go outside",
    "the cat is asleep", "rain is coming", "we like green tea", "please wait here",
    "the shop is closed", "good luck today", "read the label", "mind the step",
    "lights off at ten", "the train is late", "save your work", "drink more water",
    "fresh bread for sale", "quiet please", "back in five minutes", "no parking",
    "the garden is lovely", "call me later", "pack a warm coat", "dinner is ready",
    "turn left here", "best wishes", "all hands on deck", "one step at a time",
)

# singular -> plural; regular, -es, -y -> -ies, -f -> -ves and irregular forms.
PLURALS = (
    ("cat", "cats"), ("dog", "dogs"), ("house", "houses"), ("tree", "trees"),
    ("book", "books"), ("car", "cars"), ("apple", "apples"), ("river", "rivers"),
    ("chair", "chairs"), ("bird", "birds"), ("idea", "ideas"), ("window", "windows"),
    ("boy", "boys"), ("key", "keys"), ("day", "days"),
    ("box", "boxes"), ("bus", "buses"), ("fox", "foxes"), ("church", "churches"),
    ("dish", "dishes"), ("glass", "glasses"), ("watch", "watches"), ("brush", "brushes"),
    ("baby", "babies"), ("city", "cities"), ("party", "parties"), ("story", "stories"),
    ("berry", "berries"), ("lady", "ladies"),
    ("leaf", "leaves"), ("knife", "knives"), ("wolf", "wolves"), ("shelf", "shelves"),
    ("half", "halves"), ("loaf", "loaves"), ("life", "lives"),
    ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("child", "children"), ("mouse", "mice"), ("goose", "geese"), ("foot", "feet"),
    ("tooth", "teeth"), ("man", "men"), ("woman", "women"), ("person", "people"),
    ("ox", "oxen"), ("cactus", "cacti"), ("sheep", "sheep"), ("fish", "fish"),
    ("deer", "deer"),
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# (larger unit, smaller unit, how many smaller units make one larger unit).
UNITS = (
    ("hours", "minutes", 60), ("minutes", "seconds", 60), ("days", "hours", 24),
    ("weeks", "days", 7), ("years", "months", 12), ("metres", "centimetres", 100),
    ("centimetres", "millimetres", 10), ("kilometres", "metres", 1000),
    ("kilograms", "grams", 1000), ("litres", "millilitres", 1000),
)
UNIT_AMOUNTS = range(2, 13)  # from 2 so every unit name is plural

# Paint mixing: the three primary pairs plus two tints, asked in either order.
COLOUR_MIXES = (
    ("red", "yellow", "orange"), ("blue", "yellow", "green"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "grey"),
)

# Friendly closing lines. A share of the SFT responses get one, so the SFT model
# knows how to write them but does not always do it.
CLOSERS = ("Hope that helps!", "Happy to help!", "Have a lovely day!", "Just ask if you need more!")
CLOSER_RATE = 0.25

NUMBERS = range(2, 100)  # operands for the arithmetic family
SORT_POOL = range(1, 31)  # values to sort; drawn without repeats
SORT_SIZES = (3, 4, 5)

# ---------------------------------------------------------------------------
# Families. Each takes the shared rng and returns (prompt, response). The prompt
# templates of one family never render the same text as another's, so the number
# of distinct prompts a family can make is len(templates) x number of parameters.
# ---------------------------------------------------------------------------

_ADD_PROMPTS = (
    "What is {a} + {b}?",
    "Add {a} and {b}.",
    "What do you get when you add {a} to {b}?",
    "Calculate {a} plus {b}.",
    "What is the sum of {a} and {b}?",
)
_SUB_PROMPTS = (
    "What is {a} - {b}?",
    "Compute {a} minus {b}.",
    "Subtract {b} from {a}.",
    "What is {a} take away {b}?",
    "What is the difference when {b} is subtracted from {a}?",
)
_ARITH_RESPONSES = (
    "Sure! {a} {op} {b} = {c}.",
    "{a} {op} {b} is {c}.",
    "That's easy: {a} {op} {b} = {c}.",
    "The answer is {c}.",
)


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        a, b = rng.choice(NUMBERS), rng.choice(NUMBERS)
        prompt, op, c = rng.choice(_ADD_PROMPTS), "+", a + b
    else:
        # a >= b keeps answers non-negative: the demo is about format, not negatives.
        a = rng.choice(NUMBERS)
        b = rng.randint(NUMBERS.start, a)
        prompt, op, c = rng.choice(_SUB_PROMPTS), "-", a - b
    return prompt.format(a=a, b=b), rng.choice(_ARITH_RESPONSES).format(a=a, b=b, op=op, c=c)


_N = len(NUMBERS)
_ARITH_CAPACITY = len(_ADD_PROMPTS) * _N * _N + len(_SUB_PROMPTS) * _N * (_N + 1) // 2

_OPPOSITE_PROMPTS = (
    'What is the opposite of "{w}"?',
    'Give me the opposite of the word "{w}".',
    'What word means the opposite of "{w}"?',
    'Name the antonym of "{w}".',
)
_OPPOSITE_RESPONSES = (
    'Happy to help: the opposite of "{w}" is "{o}".',
    'The opposite of "{w}" is "{o}".',
    'Sure! "{o}" is the opposite of "{w}".',
)
# Both directions: "hot" -> "cold" and "cold" -> "hot".
_OPPOSITE_OF = {**dict(OPPOSITES), **{b: a for a, b in OPPOSITES}}
_OPPOSITE_WORDS = tuple(w for pair in OPPOSITES for w in pair)  # fixed order for the rng


def _opposites(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(_OPPOSITE_WORDS)
    o = _OPPOSITE_OF[w]
    return rng.choice(_OPPOSITE_PROMPTS).format(w=w), rng.choice(_OPPOSITE_RESPONSES).format(w=w, o=o)


_COUNT_PROMPTS = (
    'How many letters are in the word "{w}"?',
    'Count the letters in "{w}".',
    'How many letters does "{w}" have?',
    'How long is the word "{w}", in letters?',
)
_COUNT_RESPONSES = (
    'The word "{w}" has {n} letters.',
    'There are {n} letters in "{w}".',
    'Sure! "{w}" is spelled with {n} letters.',
)


def _letter_count(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return rng.choice(_COUNT_PROMPTS).format(w=w), rng.choice(_COUNT_RESPONSES).format(w=w, n=len(w))


_AFTER_PROMPTS = (
    "What day comes after {d}?",
    "Which day follows {d}?",
    "If today is {d}, what day is tomorrow?",
    "What is the day after {d}?",
    "Name the weekday that comes right after {d}.",
)
_BEFORE_PROMPTS = (
    "What day comes before {d}?",
    "Which day is just before {d}?",
    "If today is {d}, what day was yesterday?",
    "What is the day before {d}?",
    "Name the weekday that comes right before {d}.",
)
_WEEKDAY_RESPONSES = (
    "The day {rel} {d} is {x}.",
    "Sure! {x} comes right {rel} {d}.",
    "It's {x}.",
)


def _weekdays(rng: random.Random) -> tuple[str, str]:
    i = rng.randrange(len(WEEKDAYS))
    if rng.random() < 0.5:
        templates, rel, x = _AFTER_PROMPTS, "after", WEEKDAYS[(i + 1) % 7]
    else:
        templates, rel, x = _BEFORE_PROMPTS, "before", WEEKDAYS[(i - 1) % 7]
    d = WEEKDAYS[i]
    return rng.choice(templates).format(d=d), rng.choice(_WEEKDAY_RESPONSES).format(rel=rel, d=d, x=x)


_ASC_PROMPTS = (
    "Sort these numbers in ascending order: {xs}.",
    "Put these in order from smallest to largest: {xs}.",
    "Arrange from lowest to highest: {xs}.",
    "Order these numbers from small to big: {xs}.",
)
_DESC_PROMPTS = (
    "Sort these numbers in descending order: {xs}.",
    "Put these in order from largest to smallest: {xs}.",
    "Arrange from highest to lowest: {xs}.",
    "Order these numbers from big to small: {xs}.",
)
_SORT_RESPONSES = (
    "Here they are from {how}: {ys}.",
    "Sure! Sorted from {how}: {ys}.",
    "In order from {how}: {ys}.",
)


def _sorting(rng: random.Random) -> tuple[str, str]:
    xs = rng.sample(SORT_POOL, rng.choice(SORT_SIZES))
    descending = rng.random() < 0.5
    templates = _DESC_PROMPTS if descending else _ASC_PROMPTS
    how = "largest to smallest" if descending else "smallest to largest"
    ys = sorted(xs, reverse=descending)
    prompt = rng.choice(templates).format(xs=", ".join(map(str, xs)))
    return prompt, rng.choice(_SORT_RESPONSES).format(how=how, ys=", ".join(map(str, ys)))


def _permutations(n: int, k: int) -> int:
    out = 1
    for i in range(k):
        out *= n - i
    return out


_SORT_CAPACITY = (len(_ASC_PROMPTS) + len(_DESC_PROMPTS)) * sum(
    _permutations(len(SORT_POOL), k) for k in SORT_SIZES
)

_UNIT_PROMPTS = (
    "How many {small} are in {n} {big}?",
    "Convert {n} {big} to {small}.",
    "{n} {big} is how many {small}?",
    "How many {small} make up {n} {big}?",
)
_UNIT_RESPONSES = (
    "{n} {big} is {m} {small}.",
    "There are {m} {small} in {n} {big}.",
    "Sure! That's {m} {small}.",
)


def _unit_conversion(rng: random.Random) -> tuple[str, str]:
    big, small, factor = rng.choice(UNITS)
    n = rng.choice(UNIT_AMOUNTS)
    prompt = rng.choice(_UNIT_PROMPTS).format(n=n, big=big, small=small)
    return prompt, rng.choice(_UNIT_RESPONSES).format(n=n, big=big, small=small, m=n * factor)


_COLOUR_PROMPTS = (
    "What colour do you get when you mix {a} and {b}?",
    "If I mix {a} paint with {b} paint, what colour do I get?",
    "What do {a} and {b} make when mixed?",
    "What colour is {a} plus {b}?",
    "Which colour comes from mixing {a} and {b}?",
    "I blend {a} and {b} paint together. What colour is it?",
)
_COLOUR_RESPONSES = (
    "Mixing {a} and {b} gives you {c}.",
    "Sure! {A} and {b} make {c}.",
    "You get {c} when you mix {a} and {b}.",
)


def _colour_mixing(rng: random.Random) -> tuple[str, str]:
    a, b, c = rng.choice(COLOUR_MIXES)
    if rng.random() < 0.5:
        a, b = b, a  # mixing is symmetric; teach both orders
    response = rng.choice(_COLOUR_RESPONSES).format(a=a, A=a.capitalize(), b=b, c=c)
    return rng.choice(_COLOUR_PROMPTS).format(a=a, b=b), response


_BACKWARDS_PROMPTS = (
    'Spell "{w}" backwards.',
    'What is "{w}" written backwards?',
    'Reverse the letters of "{w}".',
    'Can you write the word "{w}" in reverse?',
)
_BACKWARDS_RESPONSES = (
    '"{w}" backwards is "{r}".',
    'Sure! Reversed, it reads "{r}".',
    'Here you go: "{r}".',
)


def _backwards(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return rng.choice(_BACKWARDS_PROMPTS).format(w=w), rng.choice(_BACKWARDS_RESPONSES).format(w=w, r=w[::-1])


_CAPITALS_PROMPTS = (
    'Write "{p}" in capital letters.',
    'Turn "{p}" into all caps.',
    'Please put "{p}" in upper case.',
    'How do you write "{p}" in capital letters?',
)
_CAPITALS_RESPONSES = (
    'Here it is in capitals: "{u}".',
    'Sure! Here you go: "{u}".',
    'In capital letters: "{u}".',
)


def _capitals(rng: random.Random) -> tuple[str, str]:
    p = rng.choice(PHRASES)
    return rng.choice(_CAPITALS_PROMPTS).format(p=p), rng.choice(_CAPITALS_RESPONSES).format(u=p.upper())


_PLURAL_PROMPTS = (
    'What is the plural of "{s}"?',
    'Write the plural form of "{s}".',
    'If there is more than one "{s}", what word do you use?',
    'Give me the plural of the noun "{s}".',
)
_PLURAL_RESPONSES = (
    'The plural of "{s}" is "{p}".',
    "Sure! One {s}, two {p}.",
    'It\'s "{p}".',
)


def _plurals(rng: random.Random) -> tuple[str, str]:
    s, p = rng.choice(PLURALS)
    return rng.choice(_PLURAL_PROMPTS).format(s=s), rng.choice(_PLURAL_RESPONSES).format(s=s, p=p)


# name -> (draw function, number of distinct prompts it can produce). The order is
# the round-robin order, so it is part of what makes the output reproducible.
FAMILIES: dict[str, tuple[Callable[[random.Random], tuple[str, str]], int]] = {
    "arithmetic": (_arithmetic, _ARITH_CAPACITY),
    "opposites": (_opposites, len(_OPPOSITE_PROMPTS) * len(_OPPOSITE_WORDS)),
    "letter_count": (_letter_count, len(_COUNT_PROMPTS) * len(WORDS)),
    "weekdays": (_weekdays, (len(_AFTER_PROMPTS) + len(_BEFORE_PROMPTS)) * len(WEEKDAYS)),
    "sorting": (_sorting, _SORT_CAPACITY),
    "unit_conversion": (_unit_conversion, len(_UNIT_PROMPTS) * len(UNITS) * len(UNIT_AMOUNTS)),
    "colour_mixing": (_colour_mixing, len(_COLOUR_PROMPTS) * 2 * len(COLOUR_MIXES)),
    "backwards": (_backwards, len(_BACKWARDS_PROMPTS) * len(WORDS)),
    "capitals": (_capitals, len(_CAPITALS_PROMPTS) * len(PHRASES)),
    "plurals": (_plurals, len(_PLURAL_PROMPTS) * len(PLURALS)),
}
TASKS = tuple(FAMILIES)


def max_rows() -> int:
    """The largest n that `generate` accepts: every distinct prompt of every family."""
    return sum(capacity for _, capacity in FAMILIES.values())


def generate(n: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """n distinct-prompt rows {"prompt", "response", "task"}, the same for the same seed.

    Families take turns (round-robin) so the set stays balanced; a family that has
    used up all its prompts drops out of the rotation. Rows are shuffled at the end
    so that any prefix of the file is a mix of families too.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > max_rows():
        raise ValueError(f"can make at most {max_rows()} distinct prompts, asked for {n}")
    rng = random.Random(seed)
    rows: list[dict] = []
    seen: set[str] = set()
    made = dict.fromkeys(FAMILIES, 0)
    active = list(FAMILIES)
    turn = 0
    while len(rows) < n:
        name = active[turn % len(active)]
        draw, capacity = FAMILIES[name]
        # Re-draw on a duplicate. This ends because made[name] < capacity means an
        # unseen prompt exists (capacities are exact; a test checks the small ones).
        while True:
            prompt, response = draw(rng)
            if prompt not in seen:
                break
        seen.add(prompt)
        if rng.random() < CLOSER_RATE:
            response = f"{response} {rng.choice(CLOSERS)}"
        rows.append({"prompt": prompt, "response": response, "task": name})
        made[name] += 1
        if made[name] == capacity:
            active.remove(name)  # the next family now sits at index `turn`
        else:
            turn += 1
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path) -> None:
    """One JSON object per line, keys in the order prompt, response, task."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            ordered = {"prompt": row["prompt"], "response": row["response"], "task": row["task"]}
            f.write(json.dumps(ordered, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo SFT set as JSONL.")
    parser.add_argument("--out", default=DEFAULT_PATH, help=f"output file (default {DEFAULT_PATH})")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of rows (default {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    try:
        rows = generate(args.n, args.seed)
    except ValueError as e:
        parser.error(str(e))
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
