"""Tests for the task families themselves: their tables, capacities and solvers."""

from __future__ import annotations

import random
import re

import pytest

from demo import judge, words
from demo.family import Family
from demo.tasks import FAMILIES

DRAWS = 300  # per family


def test_table_is_families_by_name():
    assert len(FAMILIES) >= 8
    for name, family in FAMILIES.items():
        assert isinstance(family, Family) and family.name == name
        assert family.prompts and family.responses and family.capacity > 0


@pytest.mark.parametrize("task", [t for t, f in FAMILIES.items() if f.capacity <= 1000])
def test_small_family_capacity_is_exact(task):
    # Generation relies on capacities being exact: too high would loop forever.
    family = FAMILIES[task]
    rng = random.Random(0)
    prompts = {family.sample(rng)[0] for _ in range(40 * family.capacity)}
    assert len(prompts) == family.capacity


def test_word_tables_are_unambiguous():
    found = [w for pair in words.OPPOSITES for w in pair]
    assert len(found) == len(set(found))
    assert all(w.isalpha() and w.islower() for w in words.WORDS)
    assert len(set(words.WORDS)) == len(words.WORDS)
    assert len({s for s, _ in words.PLURALS}) == len(words.PLURALS)


def _solves(family, prompt):
    try:
        family.solve(prompt)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("task", list(FAMILIES))
def test_solver_recovers_every_answer_its_sampler_makes(task):
    family = FAMILIES[task]
    rng = random.Random(f"solve/{task}")
    for _ in range(DRAWS):
        prompt, response = family.sample(rng)
        solution = family.solve(prompt)
        # The response is right by construction, so the answer must be in it, whole.
        assert re.search(rf"(?<!\w){re.escape(solution.answer)}(?!\w)", response), (prompt, response, solution)
        assert solution.wrong and solution.answer not in solution.wrong, solution
        # No other family can solve the prompt, so the judge reads it with this solver.
        others = [name for name, f in FAMILIES.items() if name != task and _solves(f, prompt)]
        assert not others, (prompt, others)
        assert judge.answer(prompt) == solution.answer


@pytest.mark.parametrize(
    "task, prompt",
    [
        ("opposites", 'What is the opposite of "blue"?'),  # fits a template, not in the table
        ("colour_mixing", "What colour is red plus green?"),
        ("plurals", 'What is the plural of "zzz"?'),
        ("unit_conversion", "How many hours are in 3 weeks?"),
        ("weekdays", "What day comes after Funday?"),
        ("arithmetic", "What is x + 3?"),
        ("arithmetic", "Write a poem about the sea."),
    ],
)
def test_solver_refuses_what_is_not_its_prompt(task, prompt):
    with pytest.raises(ValueError):
        FAMILIES[task].solve(prompt)
    assert judge.answer(prompt) is None


def test_solutions_by_hand():
    assert FAMILIES["arithmetic"].solve("Subtract 5 from 10.").answer == "5"
    assert FAMILIES["sorting"].solve("Arrange from highest to lowest: 3, 10, 7.") == ("10, 7, 3", ("3, 7, 10", "7, 10, 3", "10, 3, 7"))
    assert FAMILIES["weekdays"].solve("If today is Monday, what day was yesterday?").answer == "Sunday"
    assert FAMILIES["colour_mixing"].solve("What do yellow and blue make when mixed?").answer == "green"
    assert FAMILIES["plurals"].solve('Write the plural form of "mouse".').answer == "mice"
