"""The samplers against diffusers' own scheduler classes, step for step and bit for bit; their bounds; the sampler
saved with a model folder; and the guidance schedule (smartedit/guidance.py): its bounds, its branches per step, the
interval [0, 1] equal to the default bit for bit, and the UNet evaluations it saves.

The step tests feed diffusers' class and ours the same model outputs and compare the latents after every step. The
whole guided loop with each sampler is checked in tests/test_denoise_loop.py."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import assert_close, run_cli

from smartedit.errors import CheckpointError, InputError
from smartedit.graphs import EagerRunner, graph_table
from smartedit.guidance import DEFAULT_GUIDANCE, GuidanceSchedule, parse_interval
from smartedit.pipeline import SmartEditPipeline
from smartedit.scheduler import MAX_STEPS, SAMPLERS, draw_ancestral_noise, get_sampler, sampler_from_record

SHAPE = (2, 4, 8, 8)


def _step_by_step(name: str, steps: int, dtype: torch.dtype) -> None:
    s = SAMPLERS[name]
    sched = s.diffusers_scheduler()
    sched.set_timesteps(steps)
    plan = s.plan(steps, "cpu")
    assert float(plan.init_noise_sigma) == float(sched.init_noise_sigma)
    assert torch.equal(plan.table[:, 0], sched.timesteps.float())
    noise = draw_ancestral_noise(torch.Generator().manual_seed(3), steps, SHAPE, dtype) if s.noise else None
    g_ref = torch.Generator().manual_seed(3)  # diffusers draws the same noise inside its step
    eps_rng = torch.Generator().manual_seed(11)
    ref = ours = (torch.randn(SHAPE, generator=eps_rng) * plan.init_noise_sigma).to(dtype)
    history = plan.history(SHAPE, dtype, "cpu")
    for i, t in enumerate(sched.timesteps):
        eps = torch.randn(SHAPE, generator=eps_rng).to(dtype)
        sched.is_scale_input_called = True
        ref = sched.step(eps, t, ref, return_dict=False, **({"generator": g_ref} if s.noise else {}))[0]
        ours = s.step(ours, eps, plan.table[i], None if noise is None else noise[i], history)
        assert ours.dtype == ref.dtype == dtype
        assert torch.equal(ours, ref), (f"{name}, {steps} steps, step {i}: max diff "
                                        f"{(ours.float() - ref.float()).abs().max():.3e}")


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 16, 50])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_equals_diffusers_bit_for_bit_fp32(name, steps):
    _step_by_step(name, steps, torch.float32)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_each_sampler_equals_diffusers_bit_for_bit_fp16(name):
    """fp16 latents: the same dtype promotions as diffusers (0-dim fp32 constants keep fp16, Euler updates in fp32)."""
    _step_by_step(name, 7, torch.float16)


def test_a_wrong_constant_is_caught(monkeypatch):
    """The comparison can fail: one constant of a table changed (DPM-Solver++'s second-order coefficient) makes the
    latents differ from diffusers' at the first second-order step."""
    s = SAMPLERS["dpm-solver++"]

    def rows(sched, steps):
        out = s.rows(sched, steps)
        out[1][6] = out[1][6] * 1.5
        return out

    monkeypatch.setitem(SAMPLERS, "dpm-solver++", dataclasses.replace(s, rows=rows))
    with pytest.raises(AssertionError, match="step 1: max diff"):
        _step_by_step("dpm-solver++", 5, torch.float32)


def test_step_bounds_are_diffusers_own():
    """Each sampler takes 1..max_steps; past it diffusers' own class breaks: DDIM reads timestep 1000, the
    multistep solvers' timesteps repeat (a zero step: division by zero)."""
    for name, s in SAMPLERS.items():
        assert s.max_steps in range(1, MAX_STEPS + 1)
        assert torch.isfinite(s.plan(s.max_steps).table).all(), name
        for bad in (0, s.max_steps + 1, 2.0, True, "20"):
            with pytest.raises(InputError, match=f"steps must be an integer from 1 to {s.max_steps}, got"):
                s.check_steps(bad)
    ddim = SAMPLERS["ddim"].diffusers_scheduler()
    ddim.set_timesteps(MAX_STEPS)
    with pytest.raises(IndexError):
        ddim.step(torch.zeros(SHAPE), ddim.timesteps[0], torch.zeros(SHAPE))
    for name in ("dpm-solver++", "unipc"):
        sched = SAMPLERS[name].diffusers_scheduler()
        sched.set_timesteps(MAX_STEPS)
        assert len(set(sched.timesteps.tolist())) < MAX_STEPS, name
        sched.set_timesteps(MAX_STEPS - 1)
        assert len(set(sched.timesteps.tolist())) == MAX_STEPS - 1, name


def test_unknown_sampler_and_a_record_of_another_config_are_refused():
    with pytest.raises(InputError, match="sampler must be one of euler-ancestral, euler, ddim, dpm-solver\\+\\+, "
                                         "unipc, got 'heun'"):
        get_sampler("heun")
    record = SAMPLERS["ddim"].record()
    assert sampler_from_record(record, "x").name == "ddim"
    assert record["config"]["timestep_spacing"] == "leading"  # diffusers' default, recorded for the C++ runtime
    assert sampler_from_record({**record, "config": SAMPLERS["ddim"].config}, "x").name == "ddim"  # an older record
    assert sampler_from_record({**record, "config": {**record["config"], "_class_name": "DDIMScheduler"}}, "x")
    bad = {**record, "config": {**record["config"], "clip_sample": True}}
    with pytest.raises(InputError, match="x: sampler 'ddim' runs with clip_sample = False, the record says True"):
        sampler_from_record(bad, "x")
    with pytest.raises(InputError, match="must be a JSON object"):
        sampler_from_record(["ddim"], "x")


def test_the_sampler_is_saved_with_the_model_folder(tiny_pipe, tmp_path):
    from smartedit.weights import ModelSource

    pipe = SmartEditPipeline.from_weights(ModelSource(preset="tiny").load(only=[]))
    assert pipe.sampler == "euler-ancestral"
    pipe.sampler = "unipc"
    pipe.stages = tiny_pipe.stages  # the folder needs every stage's file
    pipe.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "sampler.json").read_text())
    assert saved["name"] == "unipc" and saved["class"] == "UniPCMultistepScheduler"
    assert saved["config"]["beta_schedule"] == "scaled_linear" and saved["config"]["solver_type"] == "bh2"
    assert ModelSource(model=tmp_path / "m").sampler() == "unipc"
    assert SmartEditPipeline.from_pretrained(tmp_path / "m", only=[]).sampler == "unipc"
    (tmp_path / "m" / "sampler.json").write_text(json.dumps({"name": "lms"}))
    with pytest.raises(CheckpointError, match="sampler must be one of .* got 'lms'"):
        SmartEditPipeline.from_pretrained(tmp_path / "m", only=[])
    (tmp_path / "m" / "sampler.json").unlink()  # a folder from before samplers: the official one
    assert SmartEditPipeline.from_pretrained(tmp_path / "m", only=[]).sampler == "euler-ancestral"


# -- the guidance schedule -----------------------------------------------------------------------------------------

def test_guidance_schedule_branches_and_bounds():
    assert DEFAULT_GUIDANCE.branches(5) == (3,) * 5 and DEFAULT_GUIDANCE.is_default
    assert GuidanceSchedule((0.0, 0.5)).branches(5) == (3, 3, 3, 1, 1)  # fractions 0, .25, .5, .75, 1
    assert GuidanceSchedule((0.5, 1.0)).branches(100).count(3) == 50
    assert GuidanceSchedule(text_only=(0.5, 1.0)).branches(5) == (3, 3, 2, 2, 2)
    assert GuidanceSchedule((0.0, 0.75), (0.5, 1.0)).branches(5) == (3, 3, 2, 2, 1)
    assert GuidanceSchedule((0.0, 0.0)).branches(1) == (3,) and GuidanceSchedule((0.5, 1.0)).branches(1) == (1,)
    assert GuidanceSchedule((0.0, 0.5)).evaluations(5, batch=2) == 22
    assert GuidanceSchedule.from_dict(GuidanceSchedule((0.1, 0.9), (0.2, 0.3)).to_dict()) == \
        GuidanceSchedule((0.1, 0.9), (0.2, 0.3))
    assert parse_interval("0.2, 1", "--guidance-interval") == (0.2, 1.0)
    for bad, says in (((0.5, 0.2), "0 <= start <= end <= 1, got \\[0.5, 0.2\\]"),
                      ((-0.1, 1.0), "got \\[-0.1, 1\\]"), ((0.0, 1.5), "got \\[0, 1.5\\]"),
                      ((0.0, float("nan")), "two finite numbers"), ((True, 1.0), "two finite numbers"),
                      ((0.1,), "a pair"), ("0,1", "a pair")):
        with pytest.raises(InputError, match=says):
            GuidanceSchedule(bad)
    with pytest.raises(InputError, match="text-only guidance interval must satisfy"):
        GuidanceSchedule(text_only=(1.0, 0.0))
    with pytest.raises(InputError, match="--guidance-interval must be two fractions START,END"):
        parse_interval("a,b", "--guidance-interval")
    with pytest.raises(InputError, match="a guidance schedule is"):
        GuidanceSchedule.from_dict({"start": 0})


def test_interval_0_1_equals_the_default_bit_for_bit(tiny_pipe, test_image):
    kw = dict(steps=3, seed=4, resolution=64)
    default = np.asarray(tiny_pipe(test_image, "make it blue", **kw))
    explicit = np.asarray(tiny_pipe(test_image, "make it blue", guidance_schedule=GuidanceSchedule((0.0, 1.0)), **kw))
    assert np.array_equal(default, explicit)
    cut = np.asarray(tiny_pipe(test_image, "make it blue", guidance_schedule=GuidanceSchedule((0.0, 0.4)), **kw))
    assert not np.array_equal(default, cut)


class _Counting(EagerRunner):
    """The model itself, counting the UNet rows it evaluates; `specs` as an exported folder would declare them."""

    def __init__(self, pipe, exported: bool = False):
        super().__init__(pipe.stages, pipe.config)
        self.rows = []
        if exported:
            self.specs = {"unet": graph_table(pipe.config)["unet"].spec}  # sample [3B, ...]

    def run(self, graph, inputs):
        if graph == "unet":
            self.rows.append(inputs["sample"].shape[0])
        return super().run(graph, inputs)


def test_cheaper_steps_evaluate_fewer_unet_rows_and_combine_as_documented(tiny_pipe):
    """1 branch: eps = t; 2 branches: eps = i + g_t (t - i); on the model itself they evaluate B and 2B rows. An
    exported 3-way graph evaluates 3B rows on every step and gives the same eps."""
    from smartedit.model import cfg_batch

    g = torch.Generator().manual_seed(0)
    b, q = 2, tiny_pipe.config.qformer
    latents, image = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 4, 8, 8, generator=g)
    prompt = torch.randn(b, q.num_queries, q.hidden_size, generator=g)
    residual = torch.randn(b, tiny_pipe.config.unet_residual_channels, 16, 16, generator=g)
    row = get_sampler("ddim").plan(10).table[3]
    pipe = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds)
    sample, prompts = cfg_batch(latents, image, prompt, tiny_pipe.null_text_embeds)
    e_t, e_i, _ = tiny_pipe.stages.unet_eps(sample, row[0].reshape(1), prompts, residual).chunk(3)
    for exported in (False, True):
        pipe.runner = _Counting(tiny_pipe, exported)
        one = pipe.guided_eps(latents, image, row, prompt, residual, 7.5, 1.5, branches=1)
        two = pipe.guided_eps(latents, image, row, prompt, residual, 7.5, 1.5, branches=2)
        assert pipe.runner.rows == ([3 * b, 3 * b] if exported else [b, 2 * b])
        assert_close(one, e_t, atol=1e-5, msg=f"1 branch, exported={exported}")
        assert_close(two, e_i + 7.5 * (e_t - e_i), atol=1e-4, msg=f"2 branches, exported={exported}")


def test_an_edit_with_a_schedule_counts_its_evaluations(tiny_pipe, test_image):
    pipe = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds)
    pipe.runner = _Counting(tiny_pipe)
    schedule = GuidanceSchedule((0.0, 0.5), (0.25, 0.5))
    pipe([test_image] * 2, ["make it blue"] * 2, steps=5, seed=[1, 2], resolution=64, sampler="euler",
         guidance_schedule=schedule)
    assert pipe.runner.rows == [6, 4, 4, 2, 2] and sum(pipe.runner.rows) == schedule.evaluations(5, batch=2)
    with pytest.raises(InputError, match="guidance_schedule must be a smartedit.guidance.GuidanceSchedule, got dict"):
        pipe(test_image, "x", steps=2, guidance_schedule={"interval": [0, 1]})
    with pytest.raises(InputError, match="steps must be an integer from 1 to 999, got 1000 \\(sampler 'ddim'\\)"):
        pipe(test_image, "x", steps=1000, sampler="ddim")
    with pytest.raises(InputError, match="sampler must be one of"):
        pipe(test_image, "x", steps=2, sampler="DDIM")
    assert pipe.runner.rows == [6, 4, 4, 2, 2]  # refused before any work


# -- the command line ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, says", [
    (["--sampler", "ddim", "--steps", "1000"], "steps must be an integer from 1 to 999, got 1000 (sampler 'ddim')"),
    (["--sampler", "heun"], "argument --sampler: invalid choice: 'heun'"),
    (["--guidance-interval", "0.5,0.2"], "--guidance-interval must satisfy 0 <= start <= end <= 1, got [0.5, 0.2]"),
    (["--text-only-guidance", "0.5"], "--text-only-guidance must be a pair (start, end)"),
    (["--guidance-interval", "x,1"], "--guidance-interval must be two fractions START,END in [0, 1], got 'x,1'"),
])
def test_cli_refuses_bad_levers_in_one_line(tmp_path, test_image, args, says, capsys):
    from smartedit.cli import edit_cli

    test_image.save(tmp_path / "in.png")
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--image", tmp_path / "in.png",
                                      "--instruction", "x", "--out", tmp_path / "o.png", *args], capsys)
    assert code == 2 and says in err and "Traceback" not in err, err
    assert not (tmp_path / "o.png").exists()


def test_cli_edit_with_levers_equals_the_api(tmp_path, test_image, tiny_pipe, capsys):
    from PIL import Image

    from smartedit.cli import edit_cli

    test_image.save(tmp_path / "in.png")
    code, out, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--image", tmp_path / "in.png",
                                        "--instruction", "make it blue", "--out", tmp_path / "o.png", "--quiet",
                                        "--steps", "4", "--resolution", "64", "--sampler", "unipc",
                                        "--guidance-interval", "0,0.5", "--text-only-guidance", "0.3,1"], capsys)
    assert code == 0, err
    assert "4 steps of unipc, guidance guided in [0, 0.5], else cond only; text-only in [0.3, 1] (7 UNet " \
           "evaluations, the default 12)" in out, out
    api = tiny_pipe(Image.open(tmp_path / "in.png"), "make it blue", steps=4, resolution=64, seed=0, sampler="unipc",
                    guidance_schedule=GuidanceSchedule((0.0, 0.5), (0.3, 1.0)))
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o.png")), np.asarray(api))


def test_the_readme_python_block_runs_as_written(tiny_pipe, test_image):
    """README, 'Samplers and guidance that cost less': its Python lines run as written on a pipeline and an image (the
    edit itself at 2 steps and 64 px: the arguments are the README's, the cost the tests')."""
    from conftest import readme_block

    pipe = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds)
    calls = []

    class Cheap:
        def __call__(self, *args, **kwargs):
            calls.append(kwargs)
            return pipe(*args, **{**kwargs, "steps": 2, "resolution": 64})

        def __setattr__(self, name, value):
            setattr(pipe, name, value)

    scope = {"pipe": Cheap(), "image": test_image}
    exec(readme_block("guidance_schedule=GuidanceSchedule(interval="), scope)
    assert calls[0]["sampler"] == "dpm-solver++" and calls[0]["steps"] == 20
    assert calls[0]["guidance_schedule"] == GuidanceSchedule((0.0, 0.6), (0.3, 0.6))
    assert scope["edited"].size == (64, 64) and pipe.sampler == "unipc"


def test_the_pipeline_keeps_its_last_plans(tiny_pipe):
    from smartedit.pipeline import PLAN_CACHE

    pipe = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds)
    first = pipe.plan(20, "unipc")
    assert pipe.plan(20, "unipc") is first and pipe.plan(20).sampler.name == "euler-ancestral"
    for steps in range(1, PLAN_CACHE + 2):
        pipe.plan(steps, "ddim")
    assert len(pipe._plans) == PLAN_CACHE and pipe.plan(20, "unipc") is not first
    assert torch.equal(pipe.plan(20, "unipc").table, first.table)
