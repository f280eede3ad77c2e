"""The edit, end to end, through the Python API and the `smartedit-edit` command (tiny preset, CPU)."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import assert_close, run_cli

from smartedit.cli import edit_cli
from smartedit.errors import InputError


def test_cli_edit_is_byte_identical(tmp_path, test_image, capsys):
    src = tmp_path / "in.png"
    test_image.save(src)
    digests = []
    for i in range(2):
        out = tmp_path / f"out{i}.png"
        code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--image", src, "--instruction",
                                          "make it blue", "--out", out, "--seed", "0", "--quiet"],
                               capsys)  # defaults: 256x256, 100 steps
        assert code == 0, err
        from PIL import Image

        assert Image.open(out).size == (256, 256)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]
    assert not list(tmp_path.glob(".out*"))  # no temp files left behind


@pytest.mark.parametrize("args, message", [
    (["--resolution", "100"], "resolution must be a multiple of 64 px between 64 and 4096, got 100"),
    (["--image", "missing.png"], "does not exist"),
    (["--image", "notes.txt"], "notes.txt cannot be decoded: not a PNG, JPEG or WebP image"),
    (["--steps", "0"], "must be >= 1"),
    (["--backend", "cudagraph"], "--backend cudagraph runs on cuda; --device is cpu"),
    (["--backend", "onnxruntime"], "pass --artifacts OUT"),
    (["--out", "o.gif"], "--out must end in .png, .jpg, .jpeg, .webp, got 'o.gif'"),
])
def test_cli_bad_input(tmp_path, test_image, args, message, capsys):
    test_image.save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("not an image")
    base = {"--image": str(tmp_path / "in.png"), "--out": str(tmp_path / "o.png")}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = str(tmp_path / v) if k in ("--image", "--out") else v
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--instruction", "x",
                                      *sum(base.items(), ())], capsys)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and not (tmp_path / "o.png").exists()


def test_cli_preset_needs_explicit_random_weights(tmp_path, capsys):
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--image", "x.png", "--instruction", "x", "--out",
                                      tmp_path / "o.png"], capsys)
    assert code == 2 and "--random-weights" in err


def test_pipeline_input_checks(tiny_pipe, test_image):
    with pytest.raises(InputError, match="multiple of 64 px between 64 and 4096, got 250"):
        tiny_pipe(test_image, "x", resolution=250, steps=1)
    with pytest.raises(ValueError, match="2 images and 1 instructions"):
        tiny_pipe([test_image, test_image], ["x"], steps=1)
    with pytest.raises(ValueError, match="non-empty string"):
        tiny_pipe(test_image, "  ", steps=1)
    with pytest.raises(ValueError, match="img_token_mode"):
        tiny_pipe(test_image, "x", steps=1, img_token_mode="sampled")


def test_batch_of_pairs_and_seeded_determinism(tiny_pipe, test_image):
    a = tiny_pipe([(test_image, "make it blue"), (test_image, "add a hat")], steps=2, seed=1, resolution=64)
    b = tiny_pipe([test_image, test_image], ["make it blue", "add a hat"], steps=2, seed=1, resolution=64)
    assert len(a) == 2 and all(x.size == (64, 64) for x in a)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b))
    c = tiny_pipe(test_image, "make it blue", steps=2, seed=2, resolution=64)
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c))


def test_random_template_is_seeded(tiny_pipe, test_image):
    a = tiny_pipe.encode_condition([test_image], ["x"], template="random", seed=5)[0]
    b = tiny_pipe.encode_condition([test_image], ["x"], template="random", seed=5)[0]
    assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_tiny_edit_on_cuda_fp16_matches_cpu_fp32(test_image):
    from smartedit.pipeline import SmartEditPipeline

    cpu = SmartEditPipeline.from_preset("tiny", seed=0)
    gpu = SmartEditPipeline.from_preset("tiny", seed=0).to("cuda", torch.float16)
    for a, b in zip(gpu.encode_condition([test_image], ["make it blue"]),
                    cpu.encode_condition([test_image], ["make it blue"])):
        assert_close(a.float(), b, atol=2e-2, rtol=2e-2, msg="conditioning fp16 CUDA vs fp32 CPU")


def test_cli_timings_record(tmp_path, test_image, capsys):
    import json

    test_image.save(tmp_path / "in.png")
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--image", tmp_path / "in.png",
                                      "--instruction", "make it blue", "--out", tmp_path / "o.png", "--steps", "3",
                                      "--resolution", "64", "--quiet", "--timings", tmp_path / "new" / "t.json",
                                      "--warmup", "1"], capsys)
    assert code == 0, err
    rec = json.loads((tmp_path / "new" / "t.json").read_text())
    assert set(rec["phase_ms"]) == {"condition", "vae_encode", "denoise", "vae_decode", "total"}
    assert all(v > 0 for v in rec["phase_ms"].values())
    assert rec["phase_ms"]["total"] >= rec["phase_ms"]["denoise"]
    assert rec["device"] == "cpu" and rec["warmup_edits"] == 1 and rec["per_step_ms"] > 0
