"""The quality frontier (smartedit/bench/frontier.py) and the benchmark's settings of the denoising loop
(smartedit/bench/settings.py), on the tiny preset with a few steps: what each row reports and that it is consistent
(evaluations counted on the runner equal the schedule's, FLOP ratios follow them), the files written, and bad
settings and edit files refused in one line. The committed frontier results are made by the full command, not here."""

import json

import pytest
from conftest import run_cli
from PIL import Image

from smartedit.bench.cli import main as bench_main
from smartedit.bench.frontier import EditCase, read_edits, run_frontier, to_markdown, write_outputs
from smartedit.bench.run import run_bench
from smartedit.bench.settings import FRONTIER_SETTINGS, Setting, parse_settings
from smartedit.errors import InputError
from smartedit.deepcache import DeepCache
from smartedit.guidance import GuidanceSchedule
from smartedit.weights import ModelSource

TINY = ModelSource(preset="tiny")


def test_settings_parse_label_and_bounds():
    s = Setting.parse("dpm-solver++:20:guided=0-0.6:text-only=0.3-0.6")
    assert s == Setting("dpm-solver++", 20, GuidanceSchedule((0.0, 0.6), (0.3, 0.6)))
    assert s.label == "dpm-solver++:20:guided=0-0.6:text-only=0.3-0.6" and Setting.parse(s.label) == s
    assert s.evaluations() == GuidanceSchedule((0.0, 0.6), (0.3, 0.6)).evaluations(20)
    assert Setting().is_default and Setting().label == "euler-ancestral:100" and Setting().evaluations() == 300
    assert FRONTIER_SETTINGS[0].is_default and len(set(FRONTIER_SETTINGS)) == len(FRONTIER_SETTINGS)
    assert {x.sampler for x in FRONTIER_SETTINGS} == {"euler-ancestral", "euler", "ddim", "dpm-solver++", "unipc"}
    d = Setting.parse("euler-ancestral:10:guided=0-0.6:deepcache=3/1")
    assert d.deepcache == DeepCache(3, 1) and Setting.parse(d.label) == d and d.kwargs()["deepcache"] == DeepCache(3, 1)
    # whole steps 0, 3, 6, 9 of the guidance schedule's branches 3,3,3,3,3,3,1,1,1,1 (f = i/9 <= 0.6: steps 0..5)
    assert d.evaluations() == 3 + 3 + 1 + 1
    for text, says in (("ddim", "a setting is SAMPLER:STEPS"), ("ddim:1000", "from 1 to 999, got 1000"),
                       ("heun:20", "sampler must be one of"), ("ddim:20:guided=0.5-0.2", "0 <= start <= end <= 1"),
                       ("ddim:20:cfg=0-1", "expected guided=START-END, text-only=START-END or deepcache"),
                       ("ddim:20:guided=a-b", "guided takes two fractions START-END"),
                       ("ddim:20:deepcache=x", "deepcache takes N or N/BRANCH"),
                       ("ddim:20:deepcache=0", "DeepCache interval must be an integer in \\[1, 1000\\]")):
        with pytest.raises(InputError, match=says):
            parse_settings(text)


@pytest.fixture(scope="module")
def small_frontier(tiny_pipe, test_image, tmp_path_factory):
    target = test_image.rotate(180)
    edits = [EditCase("a", test_image, "make it blue", target), EditCase("b", target, "add snow")]
    settings = parse_settings("ddim:2 dpm-solver++:3:guided=0-0.5 euler-ancestral:2:text-only=0-1 "
                              "euler-ancestral:2:deepcache=2")
    res = run_frontier(tiny_pipe, edits, settings, resolution=64, repeats=2, model="tiny (random weights)",
                       progress=lambda m: None, reference=Setting(steps=2))
    return res, write_outputs(res, tmp_path_factory.mktemp("frontier"))


def test_frontier_rows_count_evaluations_flops_time_and_quality(small_frontier):
    res, paths = small_frontier
    rows = {r["label"]: r for r in res["rows"]}
    assert list(rows) == ["euler-ancestral:2", "ddim:2", "dpm-solver++:3:guided=0-0.5",
                          "euler-ancestral:2:text-only=0-1", "euler-ancestral:2:deepcache=2"]
    assert [r["unet_evaluations"] for r in rows.values()] == [6, 6, 7, 4, 3]
    assert [r["shallow_evaluations"] for r in rows.values()] == [0, 0, 0, 0, 3]
    assert all(r["unet_evaluations"] == r["unet_evaluations_planned"] for r in rows.values())
    ref = rows["euler-ancestral:2"]
    assert ref["is_default"] and ref["psnr_vs_default_db"] is None and ref["ssim_vs_default"] == 1.0
    assert ref["time_ratio"] == 1.0 and ref["flop_ratio"] == 1.0 and ref["rounds"] == 2
    # FLOPs: the graphs once per edit plus one UNet row's FLOPs per evaluation
    once, per_row = res["tflop_per_edit_outside_the_loop"], res["tflop_per_unet_evaluation"]
    assert once > 0 and per_row > 0
    shallow_row = res["tflop_per_shallow_evaluation"]["0"]  # the runner's branch: the model's default, 0
    assert 0 < shallow_row < per_row
    for r in rows.values():
        assert r["tflop_per_edit"] == pytest.approx(once + r["unet_evaluations"] * per_row
                                                    + r["shallow_evaluations"] * shallow_row)
        assert r["time_ratio"] > 0 and r["denoise_time_ratio"] > 0
        assert 0 < r["ssim_vs_truth"] <= 1 and r["psnr_vs_truth_db"] > 0  # edit a has a ground truth
    assert rows["ddim:2"]["psnr_vs_default_db"] > 0 and rows["ddim:2"]["ssim_vs_default"] < 1
    assert res["edits"] == 2 and res["with_ground_truth"] == 1


def test_frontier_files(small_frontier):
    res, paths = small_frontier
    assert [p.name for p in paths] == ["frontier-tiny-random-weights.json", "frontier-tiny-random-weights.md",
                                       "frontier-tiny-random-weights.png"]
    assert json.loads(paths[0].read_text())["rows"][1]["label"] == "ddim:2"
    md = paths[1].read_text()
    assert md == to_markdown(res) and "| ddim:2 | 6 |" in md and "| euler-ancestral:2 (default) | 6 |" in md
    assert "PSNR vs truth dB" in md and "identical" in md
    assert Image.open(paths[2]).size[0] > 500


def test_read_edits(tmp_path, test_image):
    test_image.save(tmp_path / "in.png")
    (tmp_path / "e.json").write_text(json.dumps([{"image": "in.png", "instruction": "x", "target": "in.png"},
                                                 {"image": "in.png", "instruction": "y", "name": "second"}]))
    edits = read_edits(tmp_path / "e.json")
    assert [(e.name, e.instruction, e.target is not None) for e in edits] == [("0", "x", True), ("second", "y", False)]
    for content, says in (("[]", "lists no edits"), ('{"image": "in.png"}', "holds a JSON dict, not a list"),
                          ('[{"image": "in.png"}]', "entry 0 must be"),
                          ('[{"image": "nope.png", "instruction": "x"}]', "does not exist")):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(InputError, match=says):
            read_edits(tmp_path / "bad.json")


@pytest.mark.parametrize("args, says", [
    (["--frontier", "--edits", "missing.json"], "--edits missing.json does not exist"),
    (["--settings", "ddim:1000"], "steps must be an integer from 1 to 999, got 1000"),
    (["--sampler", "ddim", "--steps", "1000"], "steps must be an integer from 1 to 999, got 1000"),
    (["--guidance-interval", "1,0"], "--guidance-interval must satisfy 0 <= start <= end <= 1"),
])
def test_bench_refuses_bad_settings_in_one_line(tmp_path, args, says, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(bench_main, ["--preset", "tiny", "--random-weights", "--out", tmp_path / "out", *args],
                           capsys)
    assert code == 2 and says in err and "Traceback" not in err, err


def test_bench_rows_for_settings_of_the_loop():
    """The first setting runs on every row; each further one adds a row per backend at the first resolution, with its
    UNet evaluations and its speed-up over the same backend's first setting."""
    res = run_bench(TINY, backends=("eager",), resolutions=(64, 128), repeats=1, warmup=0, dtype="fp32",
                    progress=lambda m: None, settings=(Setting(steps=2), Setting("unipc", 2, GuidanceSchedule((0.0, 0.0)))))
    rows = [(r["resolution"], r["setting"], r["unet_evaluations"]) for r in res["runs"]]
    assert rows == [(64, "euler-ancestral:2", 6), (128, "euler-ancestral:2", 6), (64, "unipc:2:guided=0-0", 4)]
    assert res["runs"][2]["speedup_vs_first_setting"] > 0 and "speedup_vs_eager" not in res["runs"][2]
    from smartedit.bench.run import to_markdown as bench_markdown

    md = bench_markdown(res)
    assert "| eager | unipc:2:guided=0-0 | 4 |" in md and md.count("| eager | 64 |") == 1
