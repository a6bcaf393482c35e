"""Optional stages: part of a run only when its config names their section, and then
read by the stages that take them as a parent (the dpo stage is one)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline import config as configuration
from pipeline.runner import Runner
from pipeline.stage import Stage


@dataclasses.dataclass(frozen=True)
class Settings:
    x: int = 0


def build(cfg, inputs: dict[str, Path], out_dir: Path, seed: int) -> dict:
    (out_dir / "read.json").write_text(json.dumps(sorted(inputs)))
    return {"x": cfg.x}


def stage(name: str, inputs: tuple[str, ...], optional: bool = False) -> Stage:
    return Stage(name, Settings, inputs, lambda cfg: None, build, lambda metrics: "-", optional=optional)


STAGES = (stage("a", ()), stage("b", ("a",), optional=True), stage("c", ("a", "b")))


def runner(tmp_path: Path, yaml_text: str, *overrides: str, stages: tuple[Stage, ...] = STAGES) -> Runner:
    path = tmp_path / "run.yaml"
    path.write_text(f"run:\n  name: t\n  output_dir: {tmp_path / 'runs'}\n" + yaml_text)
    cfg = configuration.load(path, list(overrides), {s.name: s.config for s in stages})
    return Runner(cfg, stages, log=lambda line: None)


def built(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in (tmp_path / "runs" / "t").iterdir() if (p / "manifest.json").is_file())


def test_an_optional_stage_the_config_does_not_name_is_not_part_of_the_run(tmp_path):
    r = runner(tmp_path, "c:\n  x: 1\n")
    r.run()
    assert built(tmp_path) == ["a", "c"]
    assert json.loads((tmp_path / "runs/t/c/read.json").read_text()) == ["a"]
    assert "  b " not in r.status()


def test_naming_its_section_puts_it_in_the_run_and_its_children_read_it(tmp_path):
    runner(tmp_path, "b: {}\n").run()
    assert built(tmp_path) == ["a", "b", "c"]
    assert json.loads((tmp_path / "runs/t/c/read.json").read_text()) == ["a", "b"]
    manifest = json.loads((tmp_path / "runs/t/c/manifest.json").read_text())
    assert set(manifest["parents"]) == {"a", "b"}


def test_adding_the_section_later_makes_its_children_stale_and_only_them(tmp_path):
    runner(tmp_path, "").run()
    again = runner(tmp_path, "", "b.x=2")
    assert again.assess("a").state == "complete"
    assert again.assess("c").state == "stale" and again.assess("c").reasons == ["b changed"]
    assert again.plan(("c",)) == ["b", "c"]


def test_an_optional_stage_run_by_name_runs_with_its_defaults(tmp_path):
    runner(tmp_path, "").run("b")
    assert built(tmp_path) == ["a", "b"]


def test_several_stages_run_by_name_run_once_each_upstream_first(tmp_path):
    """`run d b` (one launch for several stages, as `run rm dpo`): a, b and d, each once, in
    the registry's order, and not c, which neither needs; b, optional, runs with its defaults."""
    stages = (stage("a", ()), stage("b", ("a",), optional=True), stage("d", ("a",)), stage("c", ("a", "b")))
    done = runner(tmp_path, "", stages=stages).run("d", "b")
    assert [row["stage"] for row in done] == ["a", "b", "d"] and [row["action"] for row in done] == ["built"] * 3
    assert built(tmp_path) == ["a", "b", "d"]


def test_force_with_several_stages_reruns_each_and_no_other(tmp_path):
    runner(tmp_path, "b: {}\n").run()
    ids = {name: json.loads((tmp_path / f"runs/t/{name}/manifest.json").read_text())["build_id"] for name in "abc"}
    done = runner(tmp_path, "b: {}\n").run("a", "b", force=True)
    assert [(row["stage"], row["action"]) for row in done] == [("a", "built"), ("b", "built")]
    after = {name: json.loads((tmp_path / f"runs/t/{name}/manifest.json").read_text())["build_id"] for name in "abc"}
    assert after["a"] != ids["a"] and after["b"] != ids["b"] and after["c"] == ids["c"]
