"""Tests for `demo.rankings` and the shipped rankings (completions sampled from the SFT
model, ranked by the gold judge plus rater noise): demo_rm.jsonl (K = 4, DPO's pairs) and
demo_rm_k8.jsonl (K = 8 plus a written answer, the default reward model's)."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
import types
from dataclasses import dataclass

import pytest

from demo import judge, rankings
from demo.judge import gold_score
from tests.demo import ROOT, read_jsonl

# Each shipped file: at most how many levels a ranking has (samples, plus the written answer).
SHIPPED = {"demo_rm.jsonl": 4, "demo_rm_k8.jsonl": 9}


# --- ranking -----------------------------------------------------------------------


def test_rank_orders_by_the_judge_and_keeps_one_sample_per_level():
    def judge(prompt, text):
        return float(len(text))

    samples = ["bb", "a", "ccc", "dd", "a", " ", "ccc "]
    completions, stats = rankings.rank("p", samples, judge, noise=0.0, rng=random.Random(0))
    assert [len(c) for c in completions] == [3, 2, 1], "best first, one per level, empty dropped"
    assert completions[1] in ("bb", "dd")
    assert stats == {"pairs": 3, "flipped": 0}
    assert rankings.rank("p", ["x", "y", "x"], judge, 0.0, random.Random(0))[0] == [], "one level: nothing to rank"


def test_rank_noise_flips_close_calls_and_counts_them():
    def judge(prompt, text):
        return float(len(text))

    flipped = pairs = 0
    rng = random.Random(1)
    for _ in range(200):
        completions, stats = rankings.rank("p", ["a", "bb", "ccc"], judge, noise=1.0, rng=rng)
        order = [len(c) for c in completions]
        assert stats["flipped"] == sum(order[i] < order[j] for i in range(3) for j in range(i + 1, 3))
        flipped, pairs = flipped + stats["flipped"], pairs + stats["pairs"]
    # Gaps of 1, 1 and 2 under noise std 1 flip with probability Phi(-1/sqrt 2) = 0.24
    # twice and Phi(-2/sqrt 2) = 0.08 once: 0.19 on average.
    assert 0.14 < flipped / pairs < 0.24


# --- the shipped rankings (sampled from the SFT model, ranked by the noisy judge) ----


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rankings_are_well_formed_and_from_the_rank_prompts(sets, name):
    rows = read_jsonl(ROOT / "configs" / "data" / name)
    assert len(rows) >= 250
    rank_prompts = {r["prompt"] for r in sets["rank"]}
    for r in rows:
        assert list(r) == ["prompt", "completions", "task"]
        assert r["prompt"] in rank_prompts, r
        assert 2 <= len(r["completions"]) <= SHIPPED[name], r
        assert all(c and c == c.strip() for c in r["completions"]), r
        golds = [gold_score(r["prompt"], c) for c in r["completions"]]
        assert len(set(golds)) == len(golds), f"one completion per gold level: {r}"
    assert len({r["prompt"] for r in rows}) == len(rows)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_rankings_follow_the_judge_up_to_noise(name):
    pairs = flipped = 0
    for r in read_jsonl(ROOT / "configs" / "data" / name):
        golds = [gold_score(r["prompt"], c) for c in r["completions"]]
        for i in range(len(golds)):
            for j in range(i + 1, len(golds)):
                pairs += 1
                flipped += golds[i] < golds[j]
    assert pairs > 300
    assert flipped / pairs < 0.2, f"{flipped} of {pairs} pairs against the judge"


def test_the_default_rankings_set_a_right_answer_against_the_samples():
    """The written answer puts a correct completion in nearly every ranking of
    demo_rm_k8.jsonl (demo_rm.jsonl, samples only: a third). Not in all: where a wrong
    sample scores exactly what the written answer does (wrong, but warm at both ends),
    the two are one level and the rater keeps either."""
    rows = read_jsonl(ROOT / "configs" / "data" / "demo_rm_k8.jsonl")
    with_a_right_answer = sum(any(judge.gold_parts(r["prompt"], c)["correct"] for c in r["completions"]) for r in rows)
    assert with_a_right_answer >= 0.9 * len(rows), f"{with_a_right_answer} of {len(rows)}"
    assert sum(len(r["completions"]) > 4 for r in rows) >= 30, "more levels than K = 4 allows"


# --- sampling and ranking, with the ML stack faked --------------------------------


@dataclass
class FakeResponse:
    text: str
    ended: bool


def _fake_ml_stack(monkeypatch) -> dict:
    """Stand-ins for torch, tqdm and engine.sampling, recording how they were called.

    The first prompt gets four equal answers (nothing to rank); every other gets a best,
    a middling, a wrong and an unfinished one."""
    seen: dict = {"generate": []}

    @dataclass
    class Sampling:
        max_new_tokens: int = 64
        temperature: float = 0.7

    def generate(model, tokenizer, chats, settings, batch_size, num_return_sequences=1, progress=None):
        seen["generate"].append((model, tokenizer, settings, batch_size, num_return_sequences))
        out = []
        for i, chat in enumerate(chats):
            expected = judge.answer(chat[0]["content"])
            if i == 0:
                out.append([FakeResponse("Nope.", True)] * num_return_sequences)
            else:
                texts = [f"Sure! It's {expected}. Hope that helps!", f"It's {expected}.", "No idea."]
                out.append([FakeResponse(t, True) for t in texts] + [FakeResponse(f"Sure! It's {expected} and", False)])
            progress.update(1)
        return out

    def load(path):
        seen["load"] = path
        return "model", "tokenizer"

    sampling = types.ModuleType("engine.sampling")
    sampling.Sampling = Sampling
    sampling.generate = generate
    sampling.load = load
    sampling.user_prompt = lambda text: [{"role": "user", "content": text}]
    engine = types.ModuleType("engine")
    engine.sampling = sampling

    class Bar:
        def __init__(self, total, **kwargs):
            seen["bar_total"], seen["bar_done"] = total, 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self, n):
            seen["bar_done"] += n

    tqdm, tqdm_auto = types.ModuleType("tqdm"), types.ModuleType("tqdm.auto")
    tqdm_auto.tqdm = Bar
    torch = types.ModuleType("torch")
    torch.manual_seed = lambda seed: seen.__setitem__("torch_seed", seed)
    fakes = {"torch": torch, "tqdm": tqdm, "tqdm.auto": tqdm_auto, "engine": engine, "engine.sampling": sampling}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    return seen


def test_main_samples_ranks_and_writes(monkeypatch, tmp_path, capsys, sets):
    seen = _fake_ml_stack(monkeypatch)
    out = tmp_path / "rm.jsonl"
    rankings.main(["--policy", "runs/x/sft", "--out", str(out), "--k", "4", "--noise", "0", "--limit", "5", "--max-new-tokens", "9", "--batch-size", "3"])
    assert seen["load"] == "runs/x/sft" and seen["torch_seed"] == 0
    ((_, _, settings, batch_size, k),) = seen["generate"]
    assert (settings.max_new_tokens, settings.temperature, batch_size, k) == (9, 1.0, 3, 4)
    assert seen["bar_total"] == seen["bar_done"] == 5
    rows = read_jsonl(out)
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in sets["rank"][1:5]], "the first has nothing to rank"
    for r, want in zip(rows, sets["rank"][1:5], strict=True):
        assert list(r) == ["prompt", "completions", "task"] and r["task"] == want["task"]
        # Noise 0: in the judge's order, and the unfinished sample never shown.
        assert [gold_score(r["prompt"], c) for c in r["completions"]] == [2.0, 1.0, 0.0]
    assert "wrote 4 rankings" in capsys.readouterr().out


def test_make_rankings_counts(monkeypatch):
    _fake_ml_stack(monkeypatch)
    rows, counts = rankings.make_rankings("p", rankings.Settings(k=4, noise=0.0, max_new_tokens=8, batch_size=2, limit=6))
    assert len(rows) == 5
    assert counts == {"samples": 24, "unfinished": 5, "prompts_without_a_preference": 1, "pairs": 15, "flipped_pairs": 0, "k3": 5}


def test_a_written_answer_joins_every_prompts_samples(monkeypatch, sets):
    _fake_ml_stack(monkeypatch)
    rows, counts = rankings.make_rankings("p", rankings.Settings(k=4, noise=0.0, batch_size=2, limit=6, written=True))
    assert counts["written"] == 6 and "prompts_without_a_preference" not in counts
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in sets["rank"][:6]], "the first prompt's equal samples now face a right answer"
    assert rows[0]["completions"][0].startswith(sets["rank"][0]["response"]) and rows[0]["completions"][1] == "Nope."
    for row in rows:
        golds = [gold_score(row["prompt"], c) for c in row["completions"]]
        assert golds == sorted(golds, reverse=True) and len(set(golds)) == len(golds)
    assert sum(any(c.startswith(d["response"]) for c in r["completions"]) for r, d in zip(rows, sets["rank"], strict=False)) >= 3


def test_main_refuses_k_below_two():
    with pytest.raises(SystemExit):
        rankings.main(["--k", "1"])


def test_demo_imports_only_the_standard_library():
    # Sampling pulls in the ML stack when it runs, never on import.
    code = (
        "import sys; before = set(sys.modules); "
        "import demo.judge, demo.prompts, demo.rankings, demo.sft_data, demo.tasks; "
        "new = {m.split('.')[0] for m in set(sys.modules) - before}; "
        "print(sorted(new - set(sys.stdlib_module_names) - {'demo'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_make_rankings_samples_through_the_engine_on_a_real_model(policy_dir):
    # No stand-ins: the tiny model samples K answers per prompt through engine.sampling.
    rows, counts = rankings.make_rankings(str(policy_dir), rankings.Settings(k=3, noise=0.0, max_new_tokens=6, batch_size=4, limit=6))
    assert counts["samples"] == 6 * 3
    assert counts["samples"] - counts["unfinished"] >= sum(len(r["completions"]) for r in rows)
    for row in rows:
        assert 2 <= len(row["completions"]) <= 3 and len(set(row["completions"])) == len(row["completions"])


def test_a_contrast_sets_the_written_answer_against_itself_made_wrong(monkeypatch, sets):
    _fake_ml_stack(monkeypatch)
    rows, counts = rankings.make_rankings("p", rankings.Settings(k=4, noise=0.0, batch_size=2, limit=6, written=True, contrast=True))
    twins = {d["prompt"]: judge.mistaken(d["prompt"], d["response"]) for d in sets["rank"][:6]}
    assert counts["contrasts"] == sum(t is not None for t in twins.values()) >= 3
    for row in rows:
        twin = twins[row["prompt"]]
        if twin is None:
            continue
        # Its level is the written answer's less the answer's point; the fake samples hold
        # one there ("It's X." for a plain answer, "No idea." below it), and the twin stands for it.
        assert twin in row["completions"], row
        assert not judge.gold_parts(row["prompt"], twin)["correct"]


def test_main_refuses_a_contrast_without_written_answers(capsys):
    with pytest.raises(SystemExit):
        rankings.main(["--contrast"])
    assert "--contrast needs --written" in capsys.readouterr().err


def test_rank_keeps_the_preferred_sample_for_its_level():
    def judge_(prompt, text):
        return float(len(text))

    for seed in range(20):
        completions, _ = rankings.rank("p", ["ab", "cd", "ef", "x"], judge_, 0.0, random.Random(seed), prefer="ef")
        assert completions == ["ef", "x"]


def test_another_prompt_set_is_ranked_with_its_own_noise(monkeypatch, sets):
    _fake_ml_stack(monkeypatch)
    base = rankings.Settings(k=4, noise=1.0, batch_size=2, limit=12)  # each prompt: the same three levels
    first, _ = rankings.make_rankings("p", base)
    more, _ = rankings.make_rankings("p", dataclasses.replace(base, prompt_set="rank_more"))
    assert [r["prompt"] for r in more] == [r["prompt"] for r in sets["rank_more"][1:12]]
    # The same rater noise on both sets would flip the same positions: their orders by gold would match.
    order = [[gold_score(r["prompt"], c) for c in r["completions"]] for r in first]
    assert order != [[gold_score(r["prompt"], c) for c in r["completions"]] for r in more]
