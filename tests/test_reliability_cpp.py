"""The C++ tool smartedit-runtime under bad input, one table row per case: the exit status (2 bad input, 1 failed run,
as smartedit/errors.py), one line on stderr naming the value (never a C++ backtrace or a Traceback), the inputs left
byte for byte as they were, and no output file or half-written temporary file left behind.

The build and the inputs come from test_cpp_runtime.py's helpers; the AOTI packages from the session's `aoti_export`.
Most rows are refused before any package is loaded; the few that reach the packages run one step."""

import hashlib
import json
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import save_file
from test_cpp_runtime import _inputs, _run, runtime_bin  # noqa: F401  (runtime_bin: the module's build fixture)

BACKTRACE_MARKS = ("Traceback", "Exception raised from", "frame #")


@dataclass
class Ctx:
    """What a row builds its bad input from: a fresh folder, the packages, good inputs of both commands."""
    dir: Path
    artifacts: Path
    edit_inputs: dict
    denoise_inputs: dict

    def save(self, name: str, tensors: dict) -> Path:
        save_file({k: v.contiguous() for k, v in tensors.items()}, self.dir / name)
        return self.dir / name

    def edit(self, inputs: Path, out: Path | None = None, *more) -> list:
        return ["edit", "--artifacts", self.artifacts, "--inputs", inputs, "--out", out or self.dir / "out.safetensors",
                *self._steps(more)]

    def denoise(self, inputs: Path, out: Path | None = None, *more) -> list:
        return ["denoise", "--unet", self.artifacts / "aoti" / "unet.pt2", "--inputs", inputs,
                "--out", out or self.dir / "out.safetensors", *self._steps(more)]

    @staticmethod
    def _steps(more: tuple) -> list:  # one step unless the row sets them
        return list(more) if "--steps" in more else ["--steps", 1, *more]

    def ok_edit(self) -> Path:
        return self.save("in.safetensors", self.edit_inputs)

    def ok_denoise(self) -> Path:
        return self.save("cond.safetensors", self.denoise_inputs)

    def raw(self, name: str, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
        """A hand-made safetensors file: 8-byte header length (the real one unless `length`), header, data."""
        (self.dir / name).write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)
        return self.dir / name


def _with(tensors: dict, **changes) -> dict:
    return {**tensors, **changes}


def _poisoned(t: torch.Tensor, value: float) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[t.numel() // 2] = value
    return t


def _out_same_path(c: Ctx):
    i = c.ok_edit()
    return c.edit(i, i)


def _out_other_spelling(c: Ctx):
    i = c.ok_edit()
    (c.dir / "sub").mkdir()
    return c.edit(i, c.dir / "sub" / ".." / "." / i.name)


def _out_symlink(c: Ctx):
    i = c.ok_edit()
    (c.dir / "link.safetensors").symlink_to(i)
    return c.edit(i, c.dir / "link.safetensors")


def _out_hardlink(c: Ctx):
    i = c.ok_edit()
    os.link(i, c.dir / "hard.safetensors")
    return c.edit(i, c.dir / "hard.safetensors")


def _out_is_the_unet(c: Ctx):
    return c.denoise(c.ok_denoise(), c.artifacts / "aoti" / "unet.pt2")


def _out_is_the_manifest(c: Ctx):
    return c.edit(c.ok_edit(), c.artifacts / "manifest.json")


def _out_is_a_folder(c: Ctx):
    (c.dir / "folder").mkdir()
    return c.edit(c.ok_edit(), c.dir / "folder")


def _edit_tensor(name: str, value: float):
    return lambda c: c.edit(c.save("in.safetensors", _with(c.edit_inputs, **{name: _poisoned(c.edit_inputs[name],
                                                                                           value)})))


def _denoise_tensor(name: str, value: float):
    return lambda c: c.denoise(c.save("cond.safetensors", _with(c.denoise_inputs, **{
        name: _poisoned(c.denoise_inputs[name], value)})))


def _image_100px(c: Ctx):
    image = torch.nn.functional.interpolate(c.edit_inputs["image"], size=(100, 100), mode="bilinear")
    return c.edit(c.save("in.safetensors", _with(c.edit_inputs, image=image)))


def _image_264px(c: Ctx):  # a multiple of 8 inside the exported range: the encoder takes it, the unet would not
    image = torch.nn.functional.interpolate(c.edit_inputs["image"], size=(264, 256), mode="bilinear")
    return c.edit(c.save("in.safetensors", _with(c.edit_inputs, image=image)))


def _latents_33(c: Ctx):  # the same for the bare unet package, which has no manifest to check against
    latents = torch.nn.functional.interpolate(c.denoise_inputs["image_latents"], size=(33, 32))
    return c.denoise(c.save("cond.safetensors", _with(c.denoise_inputs, image_latents=latents)))


def _negative_token_id(c: Ctx):
    ids = c.edit_inputs["prefix_ids"].clone()
    ids[0, -1] = -7
    return c.edit(c.save("in.safetensors", _with(c.edit_inputs, prefix_ids=ids)))


def _not_a_package(c: Ctx):
    (c.dir / "junk.pt2").write_bytes(b"not a zip archive\n" * 10)
    args = c.denoise(c.ok_denoise())
    args[args.index("--unet") + 1] = c.dir / "junk.pt2"
    return args


def _huge_shape(c: Ctx):
    header = b'{"x":{"dtype":"F32","shape":[1099511627776,16777216],"data_offsets":[0,0]}}'
    return c.denoise(c.raw("huge.safetensors", header))


def _shape_past_2_40(c: Ctx):
    header = b'{"x":{"dtype":"F32","shape":[1099511627777],"data_offsets":[0,4]}}'
    return c.denoise(c.raw("big.safetensors", header, b"\0" * 4))


def _header_past_the_file(c: Ctx):
    return c.denoise(c.raw("long.safetensors", b"{}", length=1 << 62))


def _offsets_not_dtype_size(c: Ctx):
    header = b'{"x":{"dtype":"F32","shape":[2,3],"data_offsets":[0,12]}}'  # 6 fp32 = 24 bytes
    return c.denoise(c.raw("offsets.safetensors", header, b"\0" * 24))


def _offsets_past_the_file(c: Ctx):
    header = b'{"x":{"dtype":"U8","shape":[64],"data_offsets":[8,72]}}'
    return c.denoise(c.raw("past.safetensors", header, b"\0" * 64))


def _deep_json(c: Ctx):
    return c.denoise(c.raw("deep.safetensors", b"[" * 200_000))


def _truncated(c: Ctx):
    blob = c.ok_denoise().read_bytes()
    (c.dir / "cut.safetensors").write_bytes(blob[: len(blob) // 2])
    return c.denoise(c.dir / "cut.safetensors")


def _copied_artifacts(c: Ctx) -> Path:
    """The export folder copied into the row's folder (an input of the row: it must come out unchanged), and used."""
    c.artifacts = Path(shutil.copytree(c.artifacts, c.dir / "artifacts"))
    return c.artifacts


def _unet_bit_flipped(c: Ctx):
    """One bit flipped in the middle of the unet package, size unchanged: only the sha256 can tell (the zip reader
    would still open it, and a flip in the weights would run). The hash costs ~1.7 GB/s per core: ~8 s for the
    13.8 GB unet at 7b, milliseconds here."""
    unet = _copied_artifacts(c) / "aoti" / "unet.pt2"
    blob = bytearray(unet.read_bytes())
    blob[len(blob) // 2] ^= 0x10
    unet.write_bytes(bytes(blob))
    return c.edit(c.ok_edit())


def _manifest_sha256_edited(c: Ctx):
    """The manifest's sha256 of a file edited (one hex digit), the file as exported: the two disagree."""
    manifest = _copied_artifacts(c) / "manifest.json"
    m = json.loads(manifest.read_text())
    files = m["artifacts"]["aoti"]["vae_decoder"]["files"]
    rel = next(r for r in files if r.endswith(".pt2"))
    digest = files[rel]["sha256"]
    files[rel]["sha256"] = ("1" if digest[0] == "0" else "0") + digest[1:]
    manifest.write_text(json.dumps(m))
    return c.edit(c.ok_edit())


def _entry_from_another_source(c: Ctx):
    """The vae_decoder's entry (and its file) as if copied in from another export: its source is another model's."""
    manifest = _copied_artifacts(c) / "manifest.json"
    m = json.loads(manifest.read_text())
    m["artifacts"]["aoti"]["vae_decoder"]["source"] = "0" * 64
    manifest.write_text(json.dumps(m))
    return c.edit(c.ok_edit())


def _manifest_nested_100k_deep(c: Ctx):
    """A manifest whose artifacts are 100000 nested arrays: refused by the parser's depth bound, not a stack overflow
    (the reader recursed once per level)."""
    manifest = _copied_artifacts(c) / "manifest.json"
    m = json.loads(manifest.read_text())
    text = json.dumps({**m, "artifacts": "@"})
    manifest.write_text(text.replace('"@"', "[" * 100_000 + "]" * 100_000))
    return c.edit(c.ok_edit())


def _manifest_over_64_mb(c: Ctx):
    manifest = _copied_artifacts(c) / "manifest.json"
    manifest.write_text(manifest.read_text() + " " * (65 << 20))
    return c.edit(c.ok_edit())


def _entry_verified(value):
    """The unet's entry as the export records a check that failed (false), or hand-edited to a non-boolean."""
    def make(c: Ctx):
        manifest = _copied_artifacts(c) / "manifest.json"
        m = json.loads(manifest.read_text())
        m["artifacts"]["aoti"]["unet"]["verified"] = value
        manifest.write_text(json.dumps(m))
        return c.edit(c.ok_edit())
    return make


def _manifest_with(edit):
    """The manifest's sampler config, edit defaults or dims changed by hand: refused naming the key and value, before
    any package loads."""
    def make(c: Ctx):
        manifest = _copied_artifacts(c) / "manifest.json"
        m = json.loads(manifest.read_text())
        edit(m)
        manifest.write_text(json.dumps(m))
        return c.edit(c.ok_edit())
    return make


def _sampler_config(**changes):
    return _manifest_with(lambda m: m["sampler"]["config"].update(changes))


def _unet_symlink_out_of_the_folder(c: Ctx):
    """The unet package a symlink to the same bytes outside the folder: the path resolves outside and is refused
    (the manifest's paths are checked after resolving links, not just by their spelling)."""
    original = c.artifacts / "aoti" / "unet.pt2"
    unet = _copied_artifacts(c) / "aoti" / "unet.pt2"
    unet.unlink()
    unet.symlink_to(original)
    return c.edit(c.ok_edit())


@dataclass
class Row:
    name: str
    make: Callable[[Ctx], list]  # -> the tool's arguments; files it makes in ctx.dir are the inputs to keep intact
    code: int
    says: str                    # in the one stderr line (any case)
    when: bool = True            # the machine can show it


ROWS = [
    # an output never destroys an input
    Row("out_is_inputs", _out_same_path, 2, "is the input"),
    Row("out_is_inputs_other_spelling", _out_other_spelling, 2, "is the input"),
    Row("out_is_symlink_to_inputs", _out_symlink, 2, "is the input"),
    Row("out_is_hardlink_to_inputs", _out_hardlink, 2, "is the input"),
    Row("out_is_the_unet_package", _out_is_the_unet, 2, "unet.pt2: refusing to overwrite an input"),
    Row("out_is_the_artifacts_manifest", _out_is_the_manifest, 2, "manifest.json of the artifacts folder"),
    Row("out_is_a_folder", _out_is_a_folder, 2, "is a folder"),
    # non-finite numbers never reach an image
    Row("guidance_scale_nan", lambda c: c.edit(c.ok_edit(), None, "--guidance-scale", "nan"), 2,
        "--guidance-scale must be a finite number, got 'nan'"),
    Row("guidance_scale_inf", lambda c: c.denoise(c.ok_denoise(), None, "--guidance-scale", "-inf"), 2,
        "--guidance-scale must be a finite number, got '-inf'"),
    Row("image_guidance_scale_inf", lambda c: c.edit(c.ok_edit(), None, "--image-guidance-scale", "infinity"), 2,
        "--image-guidance-scale must be a finite number, got 'infinity'"),
    Row("guidance_scale_overflows_double", lambda c: c.edit(c.ok_edit(), None, "--guidance-scale", "1e999"), 2,
        "--guidance-scale must be a number, got '1e999'"),
    Row("null_text_embeds_nan", _edit_tensor("null_text_embeds", float("nan")), 2,
        "tensor 'null_text_embeds' holds 1 NaN and 0 inf values"),
    Row("image_inf", _edit_tensor("image", float("inf")), 2, "tensor 'image' holds 0 NaN and 1 inf values"),
    Row("pixel_values_nan", _edit_tensor("pixel_values", float("nan")), 2, "tensor 'pixel_values' holds 1 NaN"),
    Row("image_latents_inf", _denoise_tensor("image_latents", float("-inf")), 2, "tensor 'image_latents' holds"),
    Row("latents_overflow_in_the_loop", lambda c: c.denoise(c.ok_denoise(), None, "--guidance-scale", "1e300"), 1,
        "non-finite latents at step 1 of 1"),
    # a huge finite guidance through the whole edit: whichever stage first turns non-finite stops it, no image
    Row("guidance_3e38_whole_edit", lambda c: c.edit(c.ok_edit(), None, "--guidance-scale", "3e38"), 1,
        "no image written"),
    # bad values at the boundary: one line, no backtrace
    Row("image_100px", _image_100px, 2, "size 100 of axis 2 is not a multiple of 8"),
    Row("image_264px", _image_264px, 2, "image height 264 px is not a multiple of 64 px, which the unet graph needs"),
    Row("latents_33_into_the_bare_unet", _latents_33, 2,
        "image_latents must be [B,4,h,w] with h and w positive multiples of 8 (images of a multiple of 64 px), "
        "got [1, 4, 33, 32]"),
    Row("negative_token_id", _negative_token_id, 2, "prefix_ids holds a negative token id, -7"),
    Row("steps_0", lambda c: c.edit(c.ok_edit(), None, "--steps", "0"), 2, "--steps must be >= 1, got 0"),
    Row("steps_past_the_schedule", lambda c: c.edit(c.ok_edit(), None, "--steps", "1001"), 2,
        "--steps must be <= 1000, got 1001"),
    Row("seed_negative", lambda c: c.edit(c.ok_edit(), None, "--seed", "-1"), 2, "--seed must be >= 0, got -1"),
    Row("device_unknown", lambda c: c.edit(c.ok_edit(), None, "--device", "tpu:x"), 2,
        "--device must be cpu, cuda or cuda:N, got 'tpu:x'"),
    Row("device_meta", lambda c: c.denoise(c.ok_denoise(), None, "--device", "meta"), 2,  # once a segfault
        "--device must be cpu, cuda or cuda:N, got 'meta'"),
    Row("unet_not_a_package", _not_a_package, 2, "junk.pt2 is not an AOTInductor package"),
    # every artifact file is checked against its manifest entry (inside the folder, size, sha256) before loading
    Row("entry_from_another_source", _entry_from_another_source, 2,
        "[aoti][vae_decoder] was exported from another source"),
    Row("unet_one_bit_flipped_sha256", _unet_bit_flipped, 2,
        "aoti/unet.pt2 does not match its manifest entry (sha256 "),
    Row("manifest_sha256_edited", _manifest_sha256_edited, 2,
        "aoti/vae_decoder.pt2 does not match its manifest entry (sha256 "),
    Row("unet_symlink_out_of_the_folder", _unet_symlink_out_of_the_folder, 2, "names 'aoti/unet.pt2', outside"),
    # what the export's check found wrong never runs; a manifest is parsed within bounds
    Row("entry_failed_its_check_at_export", _entry_verified(False), 2,
        "aoti/unet failed its check at export (verified: false in "),
    Row("entry_verified_not_a_boolean", _entry_verified("yes"), 2, "[aoti][unet]: 'verified' must be true, false"),
    Row("manifest_nested_100k_deep", _manifest_nested_100k_deep, 2, "nested deeper than 64 levels"),
    Row("manifest_over_64_mb", _manifest_over_64_mb, 2, "manifest.json is over 64 MB"),
    # what the manifest records for the C++ side: built as recorded, or refused naming the key and value
    Row("sampler_config_beta_schedule_unbuilt", _sampler_config(beta_schedule="squaredcos_cap_v2"), 2,
        "sampler config beta_schedule = 'squaredcos_cap_v2': the C++ runtime builds 'linear' and 'scaled_linear'"),
    Row("sampler_config_v_prediction", _sampler_config(prediction_type="v_prediction"), 2,
        "sampler config prediction_type = 'v_prediction': the C++ runtime runs epsilon prediction only"),
    Row("sampler_config_spacing_unknown", _sampler_config(timestep_spacing="sideways"), 2,
        "sampler config timestep_spacing = 'sideways'"),
    Row("sampler_config_beta_end_text", _sampler_config(beta_end="0.012"), 2,
        "sampler config beta_end = '0.012': must be a number"),
    Row("sampler_config_beta_end_1", _sampler_config(beta_end=1.5), 2, "sampler config beta_end = 1.5"),
    Row("sampler_config_zero_snr", _sampler_config(rescale_betas_zero_snr=True), 2,
        "sampler config rescale_betas_zero_snr = true: the C++ runtime does not build it"),
    Row("edit_defaults_steps_0", _manifest_with(lambda m: m["edit_defaults"].update(steps=0)), 2,
        "edit_defaults: steps = 0: must be an integer in [1, 1000]"),
    Row("edit_defaults_guidance_text", _manifest_with(lambda m: m["edit_defaults"].update(guidance_scale="7.5")), 2,
        "edit_defaults: guidance_scale = '7.5': must be a finite number"),
    Row("dims_px_negative", _manifest_with(lambda m: m["dims"]["h8"].update(px=-64)), 2, "dims h8: px = -64"),
    # torch's own error (c10::Error) escaping to main: its first line, without the C++ backtrace
    Row("device_cuda_absent", lambda c: c.denoise(c.ok_denoise(), None, "--device", "cuda"), 1, "cuda",
        when=not torch.cuda.is_available()),
    Row("option_unknown", lambda c: c.edit(c.ok_edit(), None, "--guidance", "3"), 2,
        "unknown option '--guidance' for edit"),
    # safetensors headers are validated against the file
    Row("shape_product_overflows_uint64", _huge_shape, 2, "its shape holds more elements than the file has bytes"),
    Row("shape_entry_past_2_40", _shape_past_2_40, 2, "tensor 'x': bad shape entry"),
    Row("header_length_past_the_file", _header_past_the_file, 2, "header length 4611686018427387904 exceeds"),
    Row("offsets_not_dtype_size_times_count", _offsets_not_dtype_size, 2, "[0, 12] do not hold 24 bytes"),
    Row("offsets_past_the_file", _offsets_past_the_file, 2, "[8, 72] do not hold 64 bytes within the 64-byte"),
    Row("header_200k_nested_brackets", _deep_json, 2, "nested deeper than 64 levels"),
    Row("file_cut_in_half", _truncated, 2, "cut.safetensors: tensor"),
]


@pytest.fixture(scope="module")
def good(tiny_pipe, test_image):
    """Good inputs of both commands, made once; rows change one thing."""
    edit = tiny_pipe.runtime_inputs([test_image], ["make it blue"], resolution=256)
    denoise = {**_inputs(tiny_pipe, b=1), "null_text_embeds": tiny_pipe.null_text_embeds.contiguous()}
    return edit, denoise


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(*roots: Path) -> dict:
    """Every file under `roots` (links as links) -> its sha256, or the link's target."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_symlink():
                out[p] = "-> " + os.readlink(p)
            elif p.is_file():
                out[p] = _digest(p)
    return out


def test_the_table_has_at_least_12_distinct_cases():
    assert len(ROWS) >= 12 and len({r.name for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("row", ROWS, ids=[r.name for r in ROWS])
def test_bad_input_is_one_line_and_touches_nothing(row, runtime_bin, aoti_export, good, tmp_path):  # noqa: F811
    if not row.when:
        pytest.skip("this machine does not show it")
    ctx = Ctx(tmp_path / "work", aoti_export, *good)
    ctx.dir.mkdir()
    args = row.make(ctx)
    out = Path(args[args.index("--out") + 1])

    def state():  # every file the row made (its inputs, links), and the output's folder where it is elsewhere
        files = _files(ctx.dir)
        if not out.resolve().is_relative_to(ctx.dir.resolve()) and out.parent.is_dir():
            files.update({p: _digest(p) if p == out else "" for p in out.parent.iterdir() if p.is_file()})
        return files

    before = state()

    r = _run(runtime_bin, *args)

    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == row.code, (row.name, r.returncode, r.stderr[-2000:])
    assert len(lines) == 1, f"{row.name}: stderr is not one line:\n{r.stderr[-2000:]}"
    assert lines[0].startswith("smartedit-runtime: error: "), lines[0]
    assert row.says.lower() in lines[0].lower(), (row.name, lines[0])
    assert not any(mark in r.stderr for mark in BACKTRACE_MARKS), lines[0]
    assert r.stdout == "", r.stdout[-1000:]
    assert state() == before, f"{row.name}: an input changed, or an output or temporary file was left"


def test_output_is_written_atomically_and_spares_an_input_named_like_a_temp(runtime_bin, aoti_export, good,  # noqa: F811
                                                                           tmp_path):
    """A run that works leaves exactly its output: the temporary file is unique, beside the output, renamed into
    place (an input called OUT.tmp, the old fixed temporary name, is not truncated)."""
    _, denoise = good
    save_file({k: v.contiguous() for k, v in denoise.items()}, tmp_path / "out.safetensors.tmp")
    kept = _digest(tmp_path / "out.safetensors.tmp")
    r = _run(runtime_bin, "denoise", "--unet", aoti_export / "aoti" / "unet.pt2", "--inputs",
             tmp_path / "out.safetensors.tmp", "--out", tmp_path / "out.safetensors", "--steps", 1)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _digest(tmp_path / "out.safetensors.tmp") == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "out.safetensors.tmp"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "out.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0600
