"""The C++ runtime (runtime/, CMake, libtorch of the installed torch wheel) against Python references: its
EulerAncestral table against diffusers', its safetensors I/O against the safetensors library, and its denoising
loop around the AOTInductor UNet package (and the DeepCache pair) against SmartEditPipeline.denoise for the same
seed."""

import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import AOTI_CACHE_BRANCH, SMALL_PROFILE, assert_close, made_once
from safetensors.torch import load_file, save_file

from smartedit.engines.aoti import AOTIRunner
from smartedit.engines.artifacts import Artifacts
from smartedit.deepcache import MAX_CACHE_INTERVAL, DeepCache
from smartedit.pipeline import SmartEditPipeline
from smartedit.guidance import GuidanceSchedule
from smartedit.scheduler import SAMPLERS, get_sampler
from smartedit.graphs.manifest import MANIFEST_VERSION
from smartedit.weights import ModelSource

ROOT = Path(__file__).resolve().parent.parent  # the top-level CMakeLists.txt builds runtime/


@pytest.fixture(scope="module")
def runtime_bin(tmp_path_factory):
    if not (shutil.which("cmake") and (shutil.which("c++") or shutil.which("g++"))):
        pytest.skip("cmake and a C++ compiler are needed to build runtime/")

    def build(folder):  # one build per test run, whichever test module (or xdist worker) asks first
        configure = subprocess.run(["cmake", "-S", str(ROOT), "-B", str(folder),
                                    f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                                   capture_output=True, text=True, timeout=300)
        assert configure.returncode == 0, configure.stdout[-3000:] + configure.stderr[-3000:]
        make = subprocess.run(["cmake", "--build", str(folder), f"-j{os.cpu_count() or 1}"], capture_output=True,
                              text=True, timeout=1200)
        assert make.returncode == 0, make.stdout[-3000:] + make.stderr[-3000:]

    return made_once(tmp_path_factory, "runtime_build", build)[0] / "runtime" / "smartedit-runtime"


def _run(exe, *args):
    # the threads conftest gives torch here: Inductor's CPU reductions are then split the same way in both processes
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=600, env=env)


NATIVE = ("euler-ancestral", "euler", "ddim")  # the samplers the C++ runtime runs; the others are refused by name


@pytest.mark.parametrize("steps", [1, 7, 100])
@pytest.mark.parametrize("sampler", NATIVE)
def test_schedule_equals_diffusers(runtime_bin, sampler, steps):
    args = ("schedule", steps) if sampler == "euler-ancestral" else ("schedule", steps, "--sampler", sampler)
    r = _run(runtime_bin, *args)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    plan = get_sampler(sampler).plan(steps, "cpu")  # diffusers' timesteps and sigmas, its step's constants
    assert got["sampler"] == sampler
    recorded = get_sampler(sampler).record()["config"]  # without a manifest: SmartEdit's config, key for key
    assert {k: v for k, v in got["config"].items() if k in recorded} == {k: recorded[k] for k in got["config"]
                                                                        if k in recorded}
    assert torch.equal(torch.tensor(got["table"], dtype=torch.float32), plan.table)
    assert len(got["columns"]) == plan.table.shape[1] and got["columns"][:2] == ["timestep", "sigma"]
    assert torch.tensor(got["init_noise_sigma"], dtype=torch.float32) == plan.init_noise_sigma


def test_the_runtime_knows_the_samplers_and_their_bounds_and_refuses_the_others_by_name(runtime_bin):
    r = _run(runtime_bin, "schedule", 5, "--sampler", "heun")
    assert r.returncode == 2 and f"sampler must be one of {', '.join(SAMPLERS)}, got 'heun'" in r.stderr, r.stderr
    for name, s in SAMPLERS.items():
        r = _run(runtime_bin, "schedule", s.max_steps + 1, "--sampler", name)
        if name in NATIVE:
            assert r.returncode == 2 and f"steps must be an integer from 1 to {s.max_steps}, got {s.max_steps + 1} " \
                f"(sampler '{name}')" in r.stderr, r.stderr
        else:
            assert r.returncode == 2 and f"sampler '{name}' is not run by the C++ runtime (it runs " \
                f"{', '.join(NATIVE)})" in r.stderr, r.stderr


def _inputs(pipe, b=2, h=32, seed=5):
    g = torch.Generator().manual_seed(seed)
    q, c0, grid = pipe.config.qformer, pipe.config.unet_residual_channels, pipe.config.vision.grid_size
    return {"image_latents": torch.randn(b, 4, h, h, generator=g), "prompt_embeds": torch.randn(b, 77, q.hidden_size,
                                                                                              generator=g),
            "bim_residual": torch.randn(b, c0, grid, grid, generator=g)}


def test_denoise_equals_the_pipeline(runtime_bin, aoti_export, tiny_pipe, tmp_path):
    """Same seed, same UNet package: the C++ loop must reproduce the Python loop (diffusers' scheduler)."""
    x = _inputs(tiny_pipe)
    save_file({**x, "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}, tmp_path / "in.safetensors")
    r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2",
             "--inputs", tmp_path / "in.safetensors", "--out", tmp_path / "out.safetensors", "--steps", 5,
             "--seed", 9, "--guidance-scale", 7.5,
             "--image-guidance-scale", 1.5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["ms_per_step"] > 0
    got = load_file(tmp_path / "out.safetensors")["latents"]

    packaged = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                                 random_weights=True, runner=AOTIRunner(Artifacts(aoti_export, "aoti")))
    want = packaged.denoise(x["prompt_embeds"], x["bim_residual"], x["image_latents"], steps=5,
                            generator=torch.Generator().manual_seed(9))
    # bit-identical: the same ops in the same dtypes on the same kernels (a reciprocal-multiply in place of the
    # scale_model_input division already moves the result by 1e-4 after 20 steps)
    assert torch.equal(got, want), f"C++ loop vs Python loop, same package: max diff {(got - want).abs().max():.3e}"
    eager = tiny_pipe.denoise(x["prompt_embeds"], x["bim_residual"], x["image_latents"], steps=5,
                              generator=torch.Generator().manual_seed(9))
    assert_close(got, eager, atol=1e-3, rtol=1e-3, msg="C++ loop vs eager PyTorch")
    assert not (tmp_path / "out.safetensors.tmp").exists()


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_denoise_with_a_sampler_and_a_guidance_schedule_equals_the_pipeline(runtime_bin, aoti_export, tiny_pipe,
                                                                          tmp_path, sampler):
    """--sampler and the guidance levers: the same latents as the Python pipeline on the same package, bit for bit.
    The exported unet graph takes the 3-way batch only: both evaluate 3 branches on every step and combine 3, 2
    or 1 of them as the schedule says."""
    x = _inputs(tiny_pipe)
    save_file({**x, "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}, tmp_path / "in.safetensors")
    r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
             tmp_path / "in.safetensors", "--out", tmp_path / "out.safetensors", "--steps", 5, "--seed", 9,
             "--sampler", sampler, "--guidance-interval", "0,0.75", "--text-only-guidance", "0.25,0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(tmp_path / "out.safetensors")["latents"]
    packaged = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                                 random_weights=True, runner=AOTIRunner(Artifacts(aoti_export, "aoti")))
    schedule = GuidanceSchedule((0.0, 0.75), (0.25, 0.5))
    assert schedule.branches(5) == (3, 2, 2, 3, 1)
    want = packaged.denoise(x["prompt_embeds"], x["bim_residual"], x["image_latents"], steps=5, sampler=sampler,
                            generator=torch.Generator().manual_seed(9), guidance_schedule=schedule)
    assert torch.equal(got, want), f"{sampler}: max diff {(got - want).abs().max():.3e}"
    eager = tiny_pipe.denoise(x["prompt_embeds"], x["bim_residual"], x["image_latents"], steps=5, sampler=sampler,
                              generator=torch.Generator().manual_seed(9), guidance_schedule=schedule)
    assert_close(got, eager, atol=1e-3, rtol=1e-3, msg="C++ loop vs eager PyTorch (1 and 2 branch steps evaluated "
                                                       "alone there)")
    for args, says in ((["--guidance-interval", "0.6,0.2"], "guidance interval must satisfy 0 <= start <= end <= 1, "
                                                            "got [0.6, 0.2]"),
                       (["--text-only-guidance", "0,2"], "text-only guidance interval must satisfy"),
                       (["--guidance-interval", "0.5"], "--guidance-interval must be two fractions START,END"),
                       (["--sampler", "unipc"], "sampler 'unipc' is not run by the C++ runtime")):
        r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
                 tmp_path / "in.safetensors", "--out", tmp_path / "bad.safetensors", *args)
        assert r.returncode == 2 and says in r.stderr, (args, r.stderr)
        assert not (tmp_path / "bad.safetensors").exists()


def test_bad_input_fails_fast_and_names_it(runtime_bin, aoti_export, tiny_pipe, tmp_path):
    unet = aoti_export / "aoti" / "unet.pt2"
    x = _inputs(tiny_pipe)
    save_file({**x, "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}, tmp_path / "ok.safetensors")
    save_file(x, tmp_path / "no_null.safetensors")
    save_file({**x, "prompt_embeds": x["prompt_embeds"][:1].contiguous(),
               "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}, tmp_path / "batch.safetensors")
    blob = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    out = tmp_path / "o.safetensors"
    cases = [
        (["--inputs", tmp_path / "no_null.safetensors"], 2, "has no tensor 'null_text_embeds'"),
        (["--inputs", tmp_path / "batch.safetensors"], 2, "prompt_embeds must be [2,77,D], got [1, 77, 32]"),
        (["--inputs", tmp_path / "cut.safetensors"], 2, "do not hold"),  # bad input: 2, as smartedit/errors.py
        (["--inputs", tmp_path / "missing.safetensors"], 2, "missing.safetensors: cannot open"),
        (["--inputs", tmp_path / "ok.safetensors", "--steps", "0"], 2, "--steps must be >= 1, got 0"),
        (["--inputs", tmp_path / "ok.safetensors", "--seed", "x1"], 2, "--seed must be an integer, got 'x1'"),
    ]
    for args, code, message in cases:
        r = _run(runtime_bin, "denoise", "--unet", unet, "--out", out, *args)
        assert r.returncode == code and message in r.stderr, (args, r.returncode, r.stderr[-1500:])
        assert not out.exists()
    r = _run(runtime_bin, "denoise", "--inputs", tmp_path / "ok.safetensors", "--out", out)
    assert r.returncode == 2 and "missing --unet" in r.stderr
    r = _run(runtime_bin, "render", "--inputs", tmp_path / "ok.safetensors")
    assert r.returncode == 2 and "unknown command 'render'" in r.stderr


def test_whole_edit_equals_the_pipeline(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """llava -> qformer_bim -> vae_encoder -> loop -> vae_decoder from the packages in C++, against the Python
    pipeline on the same packages (bit for bit) and against eager PyTorch."""
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "in.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "image.safetensors", "--steps", 3, "--seed", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    assert set(json.loads(r.stdout)["phase_ms"]) == {"condition", "vae_encode", "denoise", "vae_decode"}
    got = load_file(tmp_path / "image.safetensors")["image"]

    def edit(pipe):
        prompt_embeds, residual = pipe.encode_condition([test_image], ["make it blue"])
        latents = pipe.denoise(prompt_embeds, residual, pipe.encode_image([test_image], 256), steps=3,
                               generator=torch.Generator().manual_seed(1))
        return pipe.decode(latents)

    packaged = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                                 random_weights=True, runner=AOTIRunner(Artifacts(aoti_export, "aoti")))
    want = edit(packaged)
    assert torch.equal(got, want), f"C++ edit vs Python edit, same packages: max diff {(got - want).abs().max():.3e}"
    assert_close(got, edit(tiny_pipe), atol=2e-3, rtol=0, msg="C++ edit vs eager PyTorch")
    r = _run(runtime_bin, "edit", "--artifacts", tmp_path / "nowhere", "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "nowhere is not an smartedit-export output folder" in r.stderr  # ArtifactError


def test_inputs_are_cast_to_the_packages_dtypes(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """fp32 packages handed fp16 floats and int32 ids: each package casts what it is given to the dtypes its metadata
    declares (the compiled code would read the raw bytes as fp32 otherwise). The result is bit for bit the run on the
    same values given in the packages' own dtypes."""
    x = tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256)
    narrow = {k: v.half() if v.is_floating_point() else v.int() for k, v in x.items()}
    wide = {k: v.float() if v.is_floating_point() else v.long() for k, v in narrow.items()}  # exact widening
    images = []
    for name, tensors in (("narrow", narrow), ("wide", wide)):
        save_file(tensors, tmp_path / f"{name}.safetensors")
        r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / f"{name}.safetensors",
                 "--out", tmp_path / f"{name}-image.safetensors", "--steps", 2, "--seed", 4)
        assert r.returncode == 0, r.stderr[-3000:]
        images.append(load_file(tmp_path / f"{name}-image.safetensors")["image"])
    assert images[0].dtype == torch.float32 and torch.isfinite(images[0]).all()
    assert torch.equal(images[0], images[1]), f"max diff {(images[0] - images[1]).abs().max():.3e}"

    cond = {**_inputs(tiny_pipe), "null_text_embeds": tiny_pipe.null_text_embeds}
    latents = []
    for name, dtype in (("narrow", torch.float16), ("wide", torch.float32)):
        save_file({k: v.half().to(dtype).contiguous() for k, v in cond.items()}, tmp_path / f"c-{name}.safetensors")
        r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
                 tmp_path / f"c-{name}.safetensors", "--out", tmp_path / f"l-{name}.safetensors", "--steps", 2)
        assert r.returncode == 0, r.stderr[-3000:]
        latents.append(load_file(tmp_path / f"l-{name}.safetensors")["latents"])
    assert latents[0].dtype == torch.float32 and torch.equal(latents[0], latents[1])
    r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "vae_decoder.pt2", "--inputs",
             tmp_path / "c-wide.safetensors", "--out", tmp_path / "x.safetensors")
    assert r.returncode == 2 and "holds the vae_decoder graph, not unet" in r.stderr


def _copy_with(src, dst, edit):
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def test_the_edit_runs_the_sampler_its_manifest_records(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """The export records the model folder's sampler; the C++ edit runs it unless --sampler says otherwise, and
    refuses by name (exit 2, before loading a package) one it does not run."""
    assert json.loads((aoti_export / "manifest.json").read_text())["sampler"] == SAMPLERS["euler-ancestral"].record()
    ddim = _copy_with(aoti_export, tmp_path / "ddim", lambda m: m.update(sampler=SAMPLERS["ddim"].record()))
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "in.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", ddim, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "image.safetensors", "--steps", 3, "--seed", 1)
    assert r.returncode == 0 and json.loads(r.stdout)["sampler"] == "ddim", r.stderr[-3000:]
    got = load_file(tmp_path / "image.safetensors")["image"]
    packaged = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                                 random_weights=True, runner=AOTIRunner(Artifacts(aoti_export, "aoti")))
    prompt_embeds, residual = packaged.encode_condition([test_image], ["make it blue"])
    latents = packaged.denoise(prompt_embeds, residual, packaged.encode_image([test_image], 256), steps=3,
                               generator=torch.Generator().manual_seed(1), sampler="ddim")
    assert torch.equal(got, packaged.decode(latents))
    unipc = _copy_with(aoti_export, tmp_path / "unipc", lambda m: m.update(sampler=SAMPLERS["unipc"].record()))
    r = _run(runtime_bin, "edit", "--artifacts", unipc, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "x.safetensors", "--steps", 3)
    assert r.returncode == 2 and "sampler 'unipc' is not run by the C++ runtime" in r.stderr, r.stderr
    r = _run(runtime_bin, "edit", "--artifacts", unipc, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "x.safetensors", "--steps", 1, "--sampler", "euler")
    assert r.returncode == 0 and json.loads(r.stdout)["sampler"] == "euler", r.stderr[-3000:]


def _linked_with(src, dst, edit):
    """_copy_with, the files hard-linked (the manifest rewritten): for runs that read the manifest only."""
    shutil.copytree(src, dst, copy_function=os.link)
    m = json.loads((dst / "manifest.json").read_text())
    edit(m)
    (dst / "manifest.json").unlink()  # a link to the shared export's manifest: replaced, not written through
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


MODEL_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "steps_offset", "prediction_type")


@pytest.mark.parametrize("recorded, sampler, changes", [
    ("euler-ancestral", "euler-ancestral", {"beta_schedule": "linear", "beta_end": 0.02, "num_train_timesteps": 500}),
    ("euler-ancestral", "euler-ancestral", {"timestep_spacing": "trailing"}),
    ("euler-ancestral", "euler-ancestral", {"timestep_spacing": "leading", "steps_offset": 0}),
    ("euler", "euler", {"timestep_spacing": "leading", "beta_start": 0.001}),
    ("ddim", "ddim", {"timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("ddim", "ddim", {"timestep_spacing": "linspace"}),
    ("euler-ancestral", "ddim", {"beta_end": 0.02, "timestep_spacing": "trailing"}),  # another sampler: see below
])
def test_the_schedule_follows_the_config_the_manifest_records(runtime_bin, aoti_export, tmp_path, recorded, sampler,
                                                             changes):
    """A manifest whose sampler config differs from SmartEdit's gives the table diffusers computes for that config.
    Another sampler (--sampler) runs its own config on the recorded training schedule (SCHEDULER_CONFIG's keys)."""
    record = SAMPLERS[recorded].record()
    record["config"].update(changes)
    art = _linked_with(aoti_export, tmp_path / "a", lambda m: m.update(sampler=record))
    r = _run(runtime_bin, "schedule", 7, "--artifacts", art, *(["--sampler", sampler] if sampler != recorded else []))
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    reference = SAMPLERS[sampler]
    applies = changes if sampler == recorded else {k: v for k, v in changes.items() if k in MODEL_KEYS}
    plan = dataclasses.replace(reference, options={**reference.options, **applies}).plan(7)  # diffusers' own
    assert got["sampler"] == sampler
    assert torch.equal(torch.tensor(got["table"], dtype=torch.float32), plan.table)
    assert torch.tensor(got["init_noise_sigma"], dtype=torch.float32) == plan.init_noise_sigma


def test_the_edit_takes_its_defaults_from_the_manifest(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """The export records smartedit/config.py's defaults and each dim's pixels per unit; an edit without flags runs
    the manifest's defaults (here changed by hand), a flag overrides them."""
    from smartedit import config

    m = json.loads((aoti_export / "manifest.json").read_text())
    assert m["edit_defaults"] == {"steps": config.DEFAULT_STEPS, "guidance_scale": config.DEFAULT_GUIDANCE_SCALE,
                                  "image_guidance_scale": config.DEFAULT_IMAGE_GUIDANCE_SCALE, "seed": 0}
    assert m["dims"]["h8"]["px"] == config.RESOLUTION_STEP and m["dims"]["h"]["px"] == 8
    defaults = {"steps": 2, "guidance_scale": 5.0, "image_guidance_scale": 1.25, "seed": 3}
    art = _linked_with(aoti_export, tmp_path / "d", lambda m: m.update(edit_defaults=defaults))
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "in.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", art, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "a.safetensors")
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 2, r.stderr[-3000:]
    r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "b.safetensors", "--steps", 2, "--seed", 3, "--guidance-scale", 5,
             "--image-guidance-scale", 1.25)
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.equal(load_file(tmp_path / "a.safetensors")["image"], load_file(tmp_path / "b.safetensors")["image"])
    r = _run(runtime_bin, "edit", "--artifacts", art, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "c.safetensors", "--steps", 1)
    assert r.returncode == 0 and json.loads(r.stdout)["steps"] == 1, r.stderr[-3000:]
    r = _run(runtime_bin, "--help")
    assert "the manifest's" in r.stdout and "edit_defaults" in r.stdout


@pytest.fixture(scope="module")
def aoti_folded(aoti_export, tmp_path_factory):
    """The shared export with its unet re-exported with --fold-cfg (the other graphs reused)."""
    from smartedit.export.run import run_export
    from smartedit.graphs.spec import ProfileOptions

    out = tmp_path_factory.mktemp("aoti_folded") / "out"
    shutil.copytree(aoti_export, out)
    run_export(out, ModelSource(preset="tiny"), target="aoti", precision="fp32", graph_names=["unet"], fold_cfg=True,
               profile=ProfileOptions(**SMALL_PROFILE), progress=lambda m: None)
    return out


@pytest.mark.parametrize("schedule", [None, ("--text-only-guidance", "0.5,1")])
def test_a_folded_export_runs_its_graph_and_equals_the_pipelines_folded_edit(runtime_bin, aoti_folded, tiny_pipe,
                                                                            test_image, tmp_path, schedule):
    """smartedit-export --target aoti --fold-cfg: the C++ edit calls the folded unet (the combine inside it) and gives
    the Python pipeline's image on the same packages bit for bit, with a guidance schedule's cheaper steps too."""
    assert json.loads((aoti_folded / "manifest.json").read_text())["artifacts"]["aoti"]["unet"]["options"]["fold_cfg"]
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "in.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", aoti_folded, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "image.safetensors", "--steps", 3, "--seed", 1, *(schedule or ()))
    assert r.returncode == 0, r.stderr[-3000:]
    got = load_file(tmp_path / "image.safetensors")["image"]
    packaged = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                                 random_weights=True, runner=AOTIRunner(Artifacts(aoti_folded, "aoti")))
    assert packaged.runner.fold_cfg
    prompt_embeds, residual = packaged.encode_condition([test_image], ["make it blue"])
    latents = packaged.denoise(prompt_embeds, residual, packaged.encode_image([test_image], 256), steps=3,
                               generator=torch.Generator().manual_seed(1),
                               guidance_schedule=GuidanceSchedule(text_only=(0.5, 1.0)) if schedule else None)
    want = packaged.decode(latents)
    assert torch.equal(got, want), f"C++ vs Python, folded packages: max diff {(got - want).abs().max():.3e}"


def test_the_runtime_reads_files_and_specs_from_the_manifest(runtime_bin, aoti_export, tiny_pipe, test_image,
                                                            tmp_path):
    """Graph files and input specs come from manifest.json: inputs outside the exported profile are refused in the
    same words as the Python runtimes, a file outside the folder or a manifest of another version is refused."""
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=576), tmp_path / "big.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / "big.safetensors",
             "--out", tmp_path / "o.safetensors", "--steps", 1)
    assert r.returncode == 2 and "vae_encoder: image height 576 px is outside the exported range 256-512 px" in r.stderr
    moved = _copy_with(aoti_export, tmp_path / "moved", lambda m: m["artifacts"]["aoti"]["unet"].update(
        files={"../../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}))
    save_file(tiny_pipe.runtime_inputs([test_image], ["x"], resolution=256), tmp_path / "in.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", moved, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "o.safetensors", "--steps", 1)
    assert r.returncode == 2 and "names '../../../etc/passwd', outside" in r.stderr
    old = _copy_with(aoti_export, tmp_path / "old", lambda m: m.update(manifest_version=1))
    r = _run(runtime_bin, "edit", "--artifacts", old, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "o.safetensors", "--steps", 1)
    assert r.returncode == 2 and f"not manifest version {MANIFEST_VERSION}" in r.stderr
    assert not (tmp_path / "o.safetensors").exists()


def test_deeply_nested_json_is_refused_not_a_crash(runtime_bin, tiny_pipe, tmp_path):
    """A safetensors header of 200k nested '[' once overflowed the recursive parser's stack (a segfault)."""
    header = b"[" * 200_000
    (tmp_path / "deep.safetensors").write_bytes(len(header).to_bytes(8, "little") + header)
    r = _run(runtime_bin, "denoise", "--unet", tmp_path / "none.pt2", "--inputs", tmp_path / "deep.safetensors",
             "--out", tmp_path / "o.safetensors")
    assert r.returncode == 2 and "nested deeper than 64 levels" in r.stderr


def test_png_in_png_out_with_smartedit_tensors(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """The README's way round the C++ tool: smartedit-tensors pack (image + instruction -> its inputs), the edit,
    smartedit-tensors png (its output tensor -> PNG): the PNG is the Python pipeline's postprocessing of that tensor."""
    from PIL import Image

    from smartedit.cli import tensors_cli
    from smartedit.vae import postprocess

    test_image.save(tmp_path / "in.png")
    tensors_cli(["pack", "--preset", "tiny", "--random-weights", "--image", str(tmp_path / "in.png"),
                 "--instruction", "make it blue", "--out", str(tmp_path / "in.safetensors")])
    want = tiny_pipe.runtime_inputs([Image.open(tmp_path / "in.png").convert("RGB")], ["make it blue"], 256)
    got = load_file(tmp_path / "in.safetensors")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / "in.safetensors",
             "--out", tmp_path / "image.safetensors", "--steps", 2, "--seed", 0)
    assert r.returncode == 0, r.stderr[-3000:]
    tensors_cli(["png", str(tmp_path / "image.safetensors"), str(tmp_path / "out.png")])
    expected = postprocess(load_file(tmp_path / "image.safetensors")["image"])[0]
    assert list(Image.open(tmp_path / "out.png").getdata()) == list(expected.getdata())
    with pytest.raises(SystemExit) as e:
        tensors_cli(["png", str(tmp_path / "in.png"), str(tmp_path / "bad.png")])
    assert e.value.code == 2 and not (tmp_path / "bad.png").exists()


# -- DeepCache (--deepcache N: unet_deep on the whole steps, unet_shallow between; smartedit/deepcache.py) -------------


def _packaged(tiny_pipe, aoti_export):
    return SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                             random_weights=True, runner=AOTIRunner(Artifacts(aoti_export, "aoti")))


def test_deepcache_1_is_the_plain_loop(runtime_bin, aoti_export, tiny_pipe, tmp_path):
    """--deepcache 1 (the whole UNet on every step) runs the unet package: the same file, byte for byte."""
    save_file({**_inputs(tiny_pipe, b=1), "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()},
              tmp_path / "in.safetensors")
    files = []
    for name, more in (("plain", []), ("dc1", ["--deepcache", 1])):
        r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
                 tmp_path / "in.safetensors", "--out", tmp_path / f"{name}.safetensors", "--steps", 3, "--seed", 9,
                 *more)
        assert r.returncode == 0 and json.loads(r.stdout)["deepcache"] == 1, r.stderr[-3000:]
        files.append((tmp_path / f"{name}.safetensors").read_bytes())
    assert files[0] == files[1]


def test_deepcache_equals_the_pipelines_deepcache_loop(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """--deepcache 3: the same latents as the Python pipeline's DeepCache loop (DeepCache(3)) on the same packages,
    bit for bit, with the default guidance and with a guidance interval whose 3-way steps begin at step 2 (then step
    2 has more branches than the cached batch and runs whole: DeepCache.whole_steps' second rule); the edit with
    --deepcache 3 gives the pipeline's image. The shallow steps change the result (it is not the plain loop's). (The
    packages against the model's own deep and shallow paths: checked at export, test_export_aoti.py.)"""
    packaged = _packaged(tiny_pipe, aoti_export)
    assert packaged.runner.cache_branch == AOTI_CACHE_BRANCH
    x = _inputs(tiny_pipe, b=1)
    save_file({**x, "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}, tmp_path / "in.safetensors")
    late = GuidanceSchedule((0.3, 1.0))
    assert DeepCache(3).whole_steps(late.branches(7)) == (True, False, True, True, False, False, True)
    for steps, more, schedule in ((4, [], None), (7, ["--guidance-interval", "0.3,1"], late)):
        r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
                 tmp_path / "in.safetensors", "--out", tmp_path / "out.safetensors", "--steps", steps, "--seed", 9,
                 "--deepcache", 3, *more)
        assert r.returncode == 0 and json.loads(r.stdout)["deepcache"] == 3, r.stderr[-3000:]
        got = load_file(tmp_path / "out.safetensors")["latents"]

        def loop(pipe, deepcache):
            return pipe.denoise(x["prompt_embeds"], x["bim_residual"], x["image_latents"], steps=steps,
                                generator=torch.Generator().manual_seed(9), guidance_schedule=schedule,
                                deepcache=deepcache)

        want = loop(packaged, DeepCache(3))
        assert torch.equal(got, want), f"{more}: C++ vs Python DeepCache loop, max diff {(got - want).abs().max():.3e}"
        if schedule is None:
            assert (got - loop(packaged, None)).abs().max() > 1e-2, "DeepCache 3 gave the plain loop's latents"

    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "edit.safetensors")
    r = _run(runtime_bin, "edit", "--artifacts", aoti_export, "--inputs", tmp_path / "edit.safetensors",
             "--out", tmp_path / "image.safetensors", "--steps", 3, "--seed", 1, "--deepcache", 3)
    assert r.returncode == 0, r.stderr[-3000:]
    said = json.loads(r.stdout)
    assert said["deepcache"] == 3 and said["cache_branch"] == AOTI_CACHE_BRANCH
    prompt_embeds, residual = packaged.encode_condition([test_image], ["make it blue"])
    latents = packaged.denoise(prompt_embeds, residual, packaged.encode_image([test_image], 256), steps=3,
                               generator=torch.Generator().manual_seed(1), deepcache=DeepCache(3))
    assert torch.equal(load_file(tmp_path / "image.safetensors")["image"], packaged.decode(latents))


def test_bad_deepcache_is_refused_in_one_line(runtime_bin, aoti_export, tiny_pipe, test_image, tmp_path):
    """An interval outside [1, 1000], or DeepCache asked of an export without its graphs: exit 2, one line naming
    the value or what is missing, no output."""
    save_file({**_inputs(tiny_pipe, b=1), "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()},
              tmp_path / "cond.safetensors")
    save_file(tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256), tmp_path / "in.safetensors")
    (tmp_path / "bare").mkdir()  # a unet package alone: no unet_deep.pt2 / unet_shallow.pt2 beside it
    shutil.copy(aoti_export / "aoti" / "unet.pt2", tmp_path / "bare" / "unet.pt2")
    plain = _copy_with(aoti_export, tmp_path / "plain", lambda m: [m["artifacts"]["aoti"].pop(g)
                                                                  for g in ("unet_deep", "unet_shallow")])
    out = tmp_path / "o.safetensors"
    interval = (f"--deepcache must be an integer in [1, {MAX_CACHE_INTERVAL}] (the whole UNet every N steps; 1: "
                "every step)")
    denoise = ["denoise", "--inputs", tmp_path / "cond.safetensors", "--out", out, "--steps", 2]
    edit = ["edit", "--inputs", tmp_path / "in.safetensors", "--out", out, "--steps", 2]
    unet = ["--unet", aoti_export / "aoti" / "unet.pt2"]
    for args, says in (
            ([*denoise, *unet, "--deepcache", 0], f"{interval}, got 0"),
            ([*denoise, *unet, "--deepcache", MAX_CACHE_INTERVAL + 1], f"{interval}, got {MAX_CACHE_INTERVAL + 1}"),
            ([*denoise, *unet, "--deepcache", "3x"], f"{interval}, got '3x'"),
            ([*edit, "--artifacts", aoti_export, "--deepcache", -2], f"{interval}, got -2"),
            ([*denoise, "--unet", tmp_path / "bare" / "unet.pt2", "--deepcache", 3],
             f"--deepcache 3: no unet_deep.pt2 beside --unet {tmp_path / 'bare' / 'unet.pt2'} (the DeepCache graphs: "
             "smartedit-export --target aoti --deepcache [BRANCH])"),
            ([*edit, "--artifacts", plain, "--deepcache", 3],
             f"DeepCache interval 3: the export in {plain} has no DeepCache graphs (unet_deep, unet_shallow): export "
             f"them with smartedit-export --target aoti --deepcache [BRANCH] --out {plain}")):
        r = _run(runtime_bin, *args)
        assert r.returncode == 2 and r.stderr == f"smartedit-runtime: error: {says}\n", (args, r.stderr[-2000:])
        assert not out.exists()
    r = _run(runtime_bin, "--help")
    assert r.returncode == 0 and "--deepcache N (1..1000, default 1)" in r.stdout
