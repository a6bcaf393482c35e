"""Preference data for the reward model and DPO: the `data:` settings both stages take
(`PreferenceData`), and every accepted row shape becomes one `Ranking`, a prompt with K >= 2 completions and a score for each (higher is better).

Accepted rows (from any source `stages.data.read_rows` reads):

    {"prompt", "completions": [best, ..., worst]}       InstructGPT's K-wise ranking
    {"prompt", "completions": [...], "scores": [...]}   higher is better; ties make no pair
    {"prompt", "chosen", "rejected"[, "margin"]}        a plain pair
    {"chosen": dialogue, "rejected": dialogue}          whole dialogues sharing all but the
                                                        last assistant turn (HH-RLHF text, or
                                                        message lists as TRL writes them)

A prompt is a string or a list of chat messages; a completion is a string or a
one-message assistant list. A K-wise ranking yields its K(K-1)/2 ordered pairs, but
stays one example: InstructGPT found that shuffling a prompt's pairs apart overfits.
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field

from engine.chat import encode_prompt
from pipeline.config import ConfigError, SettingError, setting
from stages.shared.data import messages_field, read_rows, text_field


@dataclass(frozen=True)
class PreferenceData:
    """The `data:` section of the stages that learn from preferences (rm, dpo)."""

    train: str = setting("configs/data/demo_rm.jsonl", path="local-or-hub")
    """Rankings or pairs: .jsonl/.json/.parquet, or a Hub dataset `org/name[:split]`."""
    eval: str | None = setting(None, path="local-or-hub")
    """Held-out rows; null holds out `eval_fraction` of the train prompts (with the same seed
    and file, rm and dpo hold out the same prompts)."""
    eval_fraction: float = 0.1
    drop_bad_rows: bool = False
    """Skip (and count) rows that break a rule, instead of stopping at the first."""

    def __post_init__(self):
        if not 0 < self.eval_fraction < 1:
            raise SettingError("eval_fraction", f"must be between 0 and 1, got {self.eval_fraction}")


@dataclass
class Ranking:
    where: str
    """file:line the row came from, for errors."""
    prompt: list[dict]
    completions: list[str]
    scores: list[float]
    margin: float | None = None
    """A pair row's own margin for the loss (its "margin" key)."""
    pairs: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self):
        self.pairs = ranked_pairs(self.scores)

    @property
    def key(self) -> str:
        """Identity of the prompt: rankings that share it stay on one side of the split."""
        return json.dumps(self.prompt, sort_keys=True)


class BadRow(ConfigError):
    """A row that breaks a rule the user may choose to drop rows for (`drop_bad_rows`)."""

    def __init__(self, where: str, reason: str, problem: str):
        super().__init__(f"{where}: {problem}")
        self.reason = reason


def ranked_pairs(scores: list[float]) -> list[tuple[int, int]]:
    """(better, worse) index pairs: every pair whose scores differ. A list ranked best
    first with distinct scores gives all K(K-1)/2 pairs; tied scores give none."""
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]


def parse(where: str, row: dict) -> Ranking:
    """One row, whatever its shape, as a Ranking; BadRow (or ConfigError) if it is unusable."""
    if "completions" in row:
        prompt = _prompt(where, row)
        completions = [_completion(where, c, f"completions[{i}]") for i, c in enumerate(_list(where, row["completions"], "completions"))]
        if "scores" in row:
            scores = _list(where, row["scores"], "scores")
            # json.loads reads NaN and Infinity; a NaN score would silently drop its pairs
            if len(scores) != len(completions) or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores):
                raise BadRow(where, "scores_mismatch", f"'scores' must be {len(completions)} finite number(s), one per completion; got {row['scores']!r}")
            scores = [float(s) for s in scores]
        else:
            scores = [float(len(completions) - i) for i in range(len(completions))]  # best first
        ranking = Ranking(where, prompt, completions, scores)
    elif "chosen" in row and "rejected" in row:
        if "prompt" in row:
            prompt = _prompt(where, row)
            chosen = _completion(where, row["chosen"], "chosen")
            rejected = _completion(where, row["rejected"], "rejected")
        else:
            prompt, chosen, rejected = split_dialogues(where, row["chosen"], row["rejected"])
        margin = row.get("margin")
        if margin is not None and (not isinstance(margin, (int, float)) or isinstance(margin, bool) or not math.isfinite(margin)):
            raise ConfigError(f"{where}: 'margin' must be a finite number, got {margin!r}")
        ranking = Ranking(where, prompt, [chosen, rejected], [1.0, 0.0], None if margin is None else float(margin))
    else:
        found = ", ".join(sorted(row)) or "none"
        raise ConfigError(f"{where}: expected 'prompt' with 'completions' (best first) or 'chosen'/'rejected'; found keys: {found}")
    _check(ranking)
    return ranking


def _check(ranking: Ranking) -> None:
    where, completions = ranking.where, ranking.completions
    if len(completions) < 2:
        raise BadRow(where, "too_few_completions", f"a ranking needs at least two completions, got {len(completions)}")
    if len(set(completions)) < len(completions):
        raise BadRow(where, "duplicate_completions", "the same completion appears twice")
    if not ranking.pairs:
        raise BadRow(where, "no_pairs", "every score is tied, so there is no preference to learn")


def _list(where: str, value, key: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: '{key}' must be a list, got {type(value).__name__}")
    return value


def _prompt(where: str, row: dict) -> list[dict]:
    if "prompt" not in row:
        raise ConfigError(f"{where}: missing 'prompt'")
    prompt = row["prompt"]
    if isinstance(prompt, list):
        return messages_field(where, prompt, "prompt")
    return [{"role": "user", "content": _nonempty(where, prompt, "prompt")}]


def _completion(where: str, value, key: str) -> str:
    if isinstance(value, list):  # TRL's conversational form: [{"role": "assistant", ...}]
        messages = messages_field(where, value, key) if value else []
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise ConfigError(f"{where}: '{key}' must be a string or a single assistant message")
        return messages[0]["content"]
    return _nonempty(where, value, key)


def _nonempty(where: str, value, key: str) -> str:
    if isinstance(value, str) and not value.strip():
        raise BadRow(where, "empty_text", f"'{key}' is empty")
    return text_field(where, value, key)


# ---------------------------------------------------------------- whole dialogues

_TURN = re.compile(r"\n\n(Human|Assistant):")
_ROLE = {"Human": "user", "Assistant": "assistant"}


def split_dialogues(where: str, chosen, rejected) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen reply, rejected reply) from two dialogues that differ
    only in their last assistant turn: HH-RLHF text or lists of chat messages."""
    if isinstance(chosen, list) and isinstance(rejected, list):
        a, b = messages_field(where, chosen, "chosen"), messages_field(where, rejected, "rejected")
    elif isinstance(chosen, str) and isinstance(rejected, str):
        a, b = dialogue_messages(where, chosen, "chosen"), dialogue_messages(where, rejected, "rejected")
    else:
        raise ConfigError(f"{where}: 'chosen' and 'rejected' must both be dialogues (text or message lists) when there is no 'prompt'")
    for key, messages in (("chosen", a), ("rejected", b)):
        if messages[-1]["role"] != "assistant":
            raise ConfigError(f"{where}: '{key}' must end with an assistant turn")
    if a[:-1] != b[:-1]:
        raise BadRow(where, "prompt_mismatch", "'chosen' and 'rejected' differ before their last assistant turn, so they answer different prompts")
    if not a[:-1]:
        raise ConfigError(f"{where}: the dialogues have no prompt before the last assistant turn")
    for key, messages in (("chosen", a), ("rejected", b)):
        if not messages[-1]["content"].strip():
            raise BadRow(where, "empty_text", f"the last assistant turn of '{key}' is empty")
    return a[:-1], a[-1]["content"], b[-1]["content"]


def dialogue_messages(where: str, text: str, key: str) -> list[dict]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." as chat messages. Empty turns are kept
    (HH-RLHF has empty replies) so the caller decides what an empty reply means."""
    parts = _TURN.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ConfigError(f"{where}: '{key}' is not a dialogue of \"\\n\\nHuman: ...\" / \"\\n\\nAssistant: ...\" turns")
    return [{"role": _ROLE[role], "content": body.strip()} for role, body in zip(parts[1::2], parts[2::2], strict=True)]


# ---------------------------------------------------------------- reading and splitting


def read_rankings(rows: list[tuple[str, dict]], drop_bad_rows: bool) -> tuple[list[Ranking], dict[str, int]]:
    """Rankings from (where, row) pairs. A bad row is an error naming its line, or,
    with `drop_bad_rows`, skipped and counted by reason."""
    rankings, dropped = [], {}
    for where, row in rows:
        try:
            rankings.append(parse(where, row))
        except BadRow as e:
            if not drop_bad_rows:
                raise
            dropped[e.reason] = dropped.get(e.reason, 0) + 1
    return rankings, dropped


def split_by_prompt(rankings: list[Ranking], fraction: float, seed: int, key: str) -> tuple[list[Ranking], list[Ranking]]:
    """Train and held-out rankings, split by prompt, never by pair or row: every row
    that shares a prompt lands on the same side, so held-out accuracy is on prompts
    the model never saw."""
    prompts = sorted({r.key for r in rankings})
    check_splittable(rankings, key)
    random.Random(seed).shuffle(prompts)
    n_held = min(len(prompts) - 1, max(1, round(len(prompts) * fraction)))
    held = set(prompts[:n_held])
    return [r for r in rankings if r.key not in held], [r for r in rankings if r.key in held]


def check_splittable(rankings: list[Ranking], key: str) -> None:
    """split_by_prompt needs two distinct prompts, one to hold out."""
    if len({r.key for r in rankings}) < 2:
        raise ConfigError(f"{key}: {len({r.key for r in rankings})} distinct prompt(s) are too few to hold some out; give more rows or an eval file")


def read_data(cfg: PreferenceData, section: str) -> tuple[list[Ranking], list[Ranking] | None, dict[str, int]]:
    """A stage's `data:` read whole before anything trains: (train, held-out or None when it is
    carved from train, dropped counts); `section` ("rm", "dpo") names the keys in errors."""
    train, dropped = read_rankings(read_rows(cfg.train, f"{section}.data.train"), cfg.drop_bad_rows)
    held = None
    if cfg.eval is not None:
        held, dropped_eval = read_rankings(read_rows(cfg.eval, f"{section}.data.eval"), cfg.drop_bad_rows)
        for reason, n in dropped_eval.items():
            dropped[reason] = dropped.get(reason, 0) + n
    if not train:
        raise ConfigError(f"{section}.data.train: {cfg.train}: no usable rows (dropped: {dropped})")
    if held is None:
        check_splittable(train, f"{section}.data.train")
    return train, held, dropped


@dataclass
class Tokens:
    """A ranking in token ids, as the policy would produce each completion after the prompt."""

    prompt: list[int]
    completions: list[list[int]]
    cut: int
    """Completions cut at max_length (they keep no EOS)."""
    cut_prompt: bool


def tokenize(tokenizer, ranking: Ranking, max_length: int, max_prompt_length: int | None = None) -> Tokens:
    """The templated prompt with the generation prompt (its last `max_prompt_length` tokens when
    longer), and each completion's own tokens then EOS; a completion that does not fit in
    `max_length` is cut and keeps no EOS. Raises BadRow if the prompt leaves no room."""
    prompt_ids = encode_prompt(tokenizer, ranking.prompt)
    cut_prompt = max_prompt_length is not None and len(prompt_ids) > max_prompt_length
    if cut_prompt:
        prompt_ids = prompt_ids[-max_prompt_length:]
    room = max_length - len(prompt_ids) - 1
    if room < 1:
        raise BadRow(ranking.where, "prompt_too_long", f"the prompt is {len(prompt_ids)} tokens, which leaves no room for a completion in max_length={max_length}")
    completions, cut = [], 0
    for completion in ranking.completions:
        ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        if len(ids) > room:  # cut, and no EOS: the text did not end here
            completions.append(ids[: room + 1])
            cut += 1
        else:
            completions.append(ids + [tokenizer.eos_token_id])
    return Tokens(prompt_ids, completions, cut, cut_prompt)
