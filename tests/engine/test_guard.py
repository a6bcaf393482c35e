"""The guard's verdicts on hand-written metric histories (engine/guard.py)."""

from __future__ import annotations

import pytest

from engine import guard
from stages.rlhf import GuardSettings


def rows(train, audit, length=20.0):
    return [{"step": i + 1, "objective/scores": t, "reward/gold": a, "response/length": length} for i, (t, a) in enumerate(zip(train, audit, strict=True))]


def test_slope_is_the_least_squares_trend():
    assert guard.slope([1.0, 2.0, 3.0]) == pytest.approx(1.0)
    assert guard.slope([3.0, 1.0, 2.0, 0.0]) == pytest.approx(-0.8)  # sum((x - 1.5)(y - 1.5)) / sum((x - 1.5)^2) = -4 / 5
    assert guard.slope([5.0]) == 0.0


def test_off_by_default_and_until_a_window_is_full():
    history = rows([0.0, 1.0, 2.0, 3.0, 4.0], [4.0, 3.0, 2.0, 1.0, 0.0])
    assert guard.verdict(history, GuardSettings()) is None, "nothing is watched by default"
    watching = GuardSettings(audit="gold", window=6)
    assert guard.verdict(history, watching) is None, "five steps do not fill a window of six"


def test_over_optimisation_needs_the_train_reward_up_and_the_audit_down():
    watching = GuardSettings(audit="gold", window=4)
    assert "over-optimisation" in guard.verdict(rows([0.0, 0.5, 0.4, 1.0], [1.0, 0.8, 0.9, 0.5]), watching)
    assert guard.verdict(rows([0.0, 0.5, 0.4, 1.0], [0.5, 0.8, 0.7, 1.0]), watching) is None, "both rising is learning"
    assert guard.verdict(rows([1.0, 0.5, 0.6, 0.0], [1.0, 0.8, 0.9, 0.5]), watching) is None, "both falling is not gaming the reward"
    only_old = rows([0.0, 0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert guard.verdict(only_old, watching) is None, "only the last `window` steps count"


def test_collapse_is_a_short_mean_length_over_the_window():
    watching = GuardSettings(min_length=5.0, window=3)
    history = rows([0.0] * 4, [0.0] * 4, length=20.0)
    assert guard.verdict(history, watching) is None
    history += [{**history[-1], "step": 5 + i, "response/length": 2.0} for i in range(3)]
    assert "collapse" in guard.verdict(history, watching)


def test_bad_guard_settings_are_refused():
    from pipeline.config import SettingError

    with pytest.raises(SettingError, match="a trend needs two steps") as refused:
        GuardSettings(window=1)
    assert refused.value.key == "window"
    with pytest.raises(SettingError, match="must be positive") as refused:
        GuardSettings(min_length=0)
    assert refused.value.key == "min_length"


def test_a_guarded_run_stops_early_keeps_that_policy_and_stays_stopped_when_resumed(policy_dir, planted_rm, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    from stages import rlhf
    from tests.conftest import history
    from tests.conftest import ppo_config as config

    # Answers of at most 3 tokens are "collapsed" under a floor of 100: the guard fires once its window is full.
    cfg = config(prompts, max_new_tokens=3, steps=6, save_steps=10, guard=GuardSettings(min_length=100, window=2))
    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    assert metrics["steps"] == 2 and len(history(tmp_path)) == 2
    assert metrics["stopped_early"].startswith("collapse: responses averaged"), metrics["stopped_early"]
    AutoModelForCausalLM.from_pretrained(tmp_path)  # the policy of step 2 is saved as a plain folder
    again = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)  # as after a kill before the final save
    assert again["steps"] == 2 and again["steps_last_attempt"] == 0 and again["stopped_early"] == metrics["stopped_early"]
