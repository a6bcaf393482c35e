"""The interface every demo task family implements, and the template matching that
lets a family solve a prompt by reading it back through its own templates."""

from __future__ import annotations

import functools
import random
import re
import string
from collections.abc import Iterable, Mapping
from typing import ClassVar, NamedTuple


class Solution(NamedTuple):
    answer: str  # as it appears in a correct response
    wrong: tuple[str, ...]  # plausible mistakes, never the answer

    @classmethod
    def of(cls, answer: str, wrong: Iterable[str]) -> Solution:
        """A Solution with `wrong` deduplicated and cleared of the answer itself."""
        return cls(answer, tuple(dict.fromkeys(w for w in wrong if w != answer)))


@functools.cache
def _template_regex(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name is not None:
            parts.append(f"(?P<{name}>.+?)")
    return re.compile("".join(parts))


class Family:
    """One task family. Subclasses set the class attributes and write `sample` and `solve`."""

    name: ClassVar[str]
    prompts: ClassVar[tuple[str, ...]]  # every prompt template of the family (str.format style)
    responses: ClassVar[tuple[str, ...]]
    capacity: ClassVar[int]  # distinct prompts `sample` can make; exact, as generation relies on it

    def sample(self, rng: random.Random) -> tuple[str, str]:
        """A (prompt, response) pair drawn with `rng`; the response is correct."""
        raise NotImplementedError

    def solve(self, prompt: str) -> Solution:
        """The answer to one of this family's prompts; ValueError for any other text."""
        raise NotImplementedError

    def match(self, prompt: str, templates: Iterable[str] | None = None) -> dict[str, str] | None:
        """The fields of the first template (default: all of the family's) that renders `prompt`."""
        for template in self.prompts if templates is None else templates:
            m = _template_regex(template).fullmatch(prompt)
            if m:
                return m.groupdict()
        return None

    def fields(self, prompt: str, templates: Iterable[str] | None = None) -> dict[str, str]:
        """Like `match`, but ValueError when no template fits."""
        found = self.match(prompt, templates)
        if found is None:
            raise ValueError(f"no {self.name} template matches {prompt!r}")
        return found

    def lookup(self, table: Mapping, key, prompt: str):
        """table[key], but ValueError when missing: a prompt can fit a template yet name
        something no table holds ('the opposite of "blue"'), and is then not the family's."""
        if key not in table:
            raise ValueError(f"{key!r} in {prompt!r} is not in the {self.name} tables")
        return table[key]
