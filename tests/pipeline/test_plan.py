"""The runner's plan when a parent is rebuilt while its child is up to date: the child
was made from the parent's old build, so the run rebuilds it too (rm, made from an sft
that `run rlhf` rebuilds, is rebuilt before rlhf reads both)."""

from __future__ import annotations

import json

from tests.pipeline.test_optional_stages import built, runner, stage

# c reads a and b, b reads a: as rlhf reads sft and rm, and rm reads sft
DIAMOND = (stage("a", ()), stage("b", ("a",)), stage("c", ("a", "b")))


def build_ids(tmp_path) -> dict[str, str]:
    return {name: json.loads((tmp_path / f"runs/t/{name}/manifest.json").read_text())["build_id"] for name in built(tmp_path)}


def test_a_parent_rebuilt_for_another_stage_rebuilds_its_up_to_date_child(tmp_path):
    runner(tmp_path, "", stages=DIAMOND).run("b")
    (tmp_path / "runs/t/a/manifest.json").write_text("{not json")  # a is rebuilt; b, made from the old a, is not stale on its own
    again = runner(tmp_path, "", stages=DIAMOND)
    assert again.assess("b").state == "complete"
    done = again.run("c")
    assert [(row["stage"], row["action"]) for row in done] == [("a", "built"), ("b", "built"), ("c", "built")]
    assert again.assess("b").reasons == ["a is rebuilt in this run"]
    ids = build_ids(tmp_path)
    for child, parent in (("b", "a"), ("c", "a"), ("c", "b")):
        made_from = json.loads((tmp_path / f"runs/t/{child}/manifest.json").read_text())["parents"][parent]["build_id"]
        assert made_from == ids[parent], f"{child} was made from the {parent} this run built"
    assert "stale" not in runner(tmp_path, "", stages=DIAMOND).status()


def test_an_up_to_date_child_whose_parents_are_kept_is_reused(tmp_path):
    runner(tmp_path, "", stages=DIAMOND).run("b")
    ids = build_ids(tmp_path)
    done = runner(tmp_path, "", stages=DIAMOND).run("c")
    assert [(row["stage"], row["action"]) for row in done] == [("a", "reused"), ("b", "reused"), ("c", "built")]
    assert {name: build_ids(tmp_path)[name] for name in "ab"} == ids
