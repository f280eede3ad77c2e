"""The reliability catalogue: bad inputs and faults against every Python command, one table row each.

Every row runs a command in this process on a fresh copy of its inputs and asserts what must hold for any bad input:
the exit status (2 bad input, 1 failed run), exactly one `<prog>: error:` line on stderr naming the value, no
traceback, every input file byte-identical afterwards, and no output (or half-written `.tmp-` leftover) written.
The principles, numbered as each row and test cites them: 1 an output never destroys an input; 2 non-finite numbers
never reach an image; 3 what runs is what was verified; 4 a folder in use or a full disk fails the run cleanly; 5 one
clear line, never a traceback; 6 bounded work; 7 never the network; 8 outputs get the modes an ordinary write gives;
9 inputs mean what they say; 10 the benchmark refuses what it cannot measure. The C++ tool's rows are in
test_reliability_cpp.py, the export folder's (locks, staging, foreign files, profiles) in test_reliability_export.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import run_cli

pytestmark = pytest.mark.filterwarnings("ignore")


@dataclass
class W:
    """One row's workspace: fresh copies of every input it may touch, and where outputs go."""

    root: Path
    model: Path       # a converted tiny model folder
    release: Path     # the tiny model in the official release layout: official/, llava/, clip/, ip2p/
    image: Path       # a 96x128 RGB PNG
    artifacts: Path   # the tiny fp32 ONNX export
    out: Path         # a folder for outputs (empty)
    pristine_aoti: Path | None = None  # the tiny AOTInductor export, copied by the rows that use it
    inputs: list[Path] = field(default_factory=list)

    def edit(self, *extra, model=None) -> list:
        return ["--model", model or self.model, "--image", self.image, "--instruction", "make it blue",
                "--out", self.out / "edit.png", "--steps", "2", "--resolution", "64", "--quiet", *extra]

    def ort(self, *extra) -> list:
        """An edit on the ONNX export of the tiny preset (random weights, seed 0), in ONNX Runtime."""
        return ["--preset", "tiny", "--random-weights", *self.edit("--backend", "onnxruntime", "--artifacts",
                                                                   self.artifacts, "--resolution", "256", *extra)[2:]]

    def aoti(self, *extra) -> list:
        """An edit on the AOTInductor export of the tiny preset (see _aoti)."""
        return ["--preset", "tiny", "--random-weights", *self.edit("--backend", "aoti", "--artifacts",
                                                                   self.root / "aoti", "--resolution", "256",
                                                                   *extra)[2:]]

    def manifest(self, change: Callable[[dict], object], folder: Path | None = None) -> None:
        path = (folder or self.artifacts) / "manifest.json"
        m = json.loads(path.read_text())
        new = change(m)  # a change may return a whole new value (a list: "the manifest is a list")
        path.write_text(json.dumps(new if isinstance(new, list) else m))

    def entry(self, graph: str) -> dict:
        return json.loads((self.artifacts / "manifest.json").read_text())["artifacts"]["onnx"][graph]

    def config(self, change: Callable[[dict], None]) -> None:
        d = json.loads((self.model / "config.json").read_text())
        change(d)
        (self.model / "config.json").write_text(json.dumps(d))

    def weights(self, stage: str, change: Callable[[dict], None]) -> None:
        path = self.model / f"{stage}.safetensors"
        sd = load_file(path)
        change(sd)
        save_file(sd, path)


def _flip_bit(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x10
    path.write_bytes(bytes(data))


def _safetensors_header(path: Path, header: dict, body: bytes = b"") -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def _edit(*a):
    from smartedit.cli import edit_cli

    return edit_cli, list(a)


# -- the table -------------------------------------------------------------------------------------------------------
# (id, principle, prepare(w) -> (main, argv), exit status, what the error line must name)


def _cli(name: str):
    import importlib

    mod, fn = {"edit": ("smartedit.cli", "edit_cli"), "convert": ("smartedit.cli", "convert_cli"),
               "tensors": ("smartedit.cli", "tensors_cli"), "verify": ("smartedit.export.verify", "main"),
               "bench": ("smartedit.bench.cli", "main")}[name]
    return getattr(importlib.import_module(mod), fn)


def _convert(w: W, out, *extra) -> list:
    r = w.release
    return [r / "official", out, "--preset", "tiny", "--llava", r / "llava", "--ip2p", r / "ip2p",
            "--clip", r / "clip", *extra]


def _bench(w: W, *extra) -> list:
    return ["--model", w.model, "--backends", "eager", "--resolution", "64", "--steps", "1", "--repeats", "1",
            "--warmup", "0", "--out", w.out / "bench", *extra]


def _link(src: Path, dst: Path, kind: str) -> Path:
    (os.link if kind == "hard" else os.symlink)(src, dst)
    return dst


def _user_files(w: W) -> Path:
    d = w.root / "photos"
    d.mkdir()
    (d / "holiday.jpg").write_bytes(b"not ours")
    w.inputs.append(d)
    return d


CASES = [
    # 1: an output never destroys an input
    ("edit-out-is-image", 1, lambda w: ("edit", w.edit("--out", w.image)), 2, "--out"),
    ("edit-out-hardlink-to-image", 1,
     lambda w: ("edit", w.edit("--out", _link(w.image, w.root / "same.png", "hard"))), 2, "same.png"),
    ("edit-out-symlink-to-image", 1,
     lambda w: ("edit", w.edit("--out", _link(w.image, w.root / "same.png", "sym"))), 2, "same.png"),
    ("edit-out-is-model-file", 1, lambda w: ("edit", w.edit("--out", w.model / "x.png", "--timings",
                                                            w.model / "config.json")), 2, "config.json"),
    ("edit-timings-is-image", 1, lambda w: ("edit", w.edit("--timings", w.image)), 2, "--timings"),
    ("edit-timings-is-out", 1, lambda w: ("edit", w.edit("--timings", w.out / "edit.png")), 2, "--timings"),
    ("convert-out-is-release-overwrite", 1,
     lambda w: ("convert", _convert(w, w.release / "official", "--overwrite")), 2, "official"),
    ("convert-out-is-llava-overwrite", 1,
     lambda w: ("convert", _convert(w, w.release / "llava", "--overwrite")), 2, "llava"),
    ("convert-out-holds-the-release", 1,
     lambda w: ("convert", _convert(w, w.release, "--overwrite")), 2, str("release")),
    ("convert-out-is-model-in-use-as-input", 1,
     lambda w: ("convert", _convert(w, w.release / "ip2p" / "vae", "--overwrite")), 2, "vae"),
    ("convert-overwrite-foreign-folder", 1,
     lambda w: ("convert", _convert(w, _user_files(w), "--overwrite")), 2, "holiday.jpg"),
    ("convert-into-non-empty-folder", 1, lambda w: ("convert", _convert(w, _user_files(w))), 2, "photos"),
    ("tensors-pack-out-is-image", 1,
     lambda w: ("tensors", ["pack", "--model", w.model, "--image", w.image, "--instruction", "x",
                            "--out", w.image]), 2, "--out"),
    ("tensors-png-out-is-input", 1,
     lambda w: ("tensors", ["png", w.model / "vae.safetensors", w.model / "vae.safetensors"]), 2, "vae.safetensors"),
    ("bench-out-is-a-file", 10, lambda w: ("bench", _bench(w, "--out", w.image)), 2, "--out"),
    # 2: non-finite numbers never reach an image
    ("edit-guidance-nan", 2, lambda w: ("edit", w.edit("--guidance-scale", "nan")), 2, "guidance_scale"),
    ("edit-image-guidance-inf", 2, lambda w: ("edit", w.edit("--image-guidance-scale", "inf")), 2,
     "image_guidance_scale"),
    ("edit-guidance-minus-inf", 2, lambda w: ("edit", w.edit("--guidance-scale=-inf")), 2, "-inf"),
    ("null-text-nan", 2, lambda w: (w.weights("null_text", lambda sd: sd["null_text_embeds"].__setitem__(
        (0, 0, 0), float("nan"))), ("edit", w.edit()))[1], 2, "null_text_embeds"),
    ("weight-inf", 2, lambda w: (w.weights("unet", lambda sd: sd[sorted(sd)[0]].view(-1).__setitem__(
        0, float("inf"))), ("edit", w.edit()))[1], 2, "non-finite"),
    ("latents-overflow", 2, lambda w: (w.weights("unet", lambda sd: sd["unet.conv_out.weight"].fill_(3e38)),
                                       ("edit", w.edit()))[1], 1, "not finite"),
    ("tensors-png-nan", 2, lambda w: (save_file({"image": torch.full((1, 3, 8, 8), float("nan"))},
                                                w.root / "nan.safetensors"),
                                      ("tensors", ["png", w.root / "nan.safetensors", w.out / "x.png"]))[1],
     2, "non-finite"),
    # 3: what runs is what was verified
    ("artifact-bit-flip", 3, lambda w: (_flip_bit(w.artifacts / "onnx" / "unet.onnx"), ("edit", w.ort()))[1],
     2, "sha256"),
    ("artifact-path-escapes", 3, lambda w: (w.manifest(lambda m: _retarget(m, "../../../../etc/passwd")),
                                            ("edit", w.ort()))[1], 2, "outside"),
    ("artifact-symlink-escapes", 3, lambda w: (
        (w.artifacts / "onnx" / "unet.onnx").unlink(),
        os.symlink(w.image, w.artifacts / "onnx" / "unet.onnx"), ("edit", w.ort()))[2], 2, "outside"),
    ("manifest-no-graphs", 3, lambda w: (w.manifest(lambda m: m["artifacts"]["onnx"].clear()),
                                         ("edit", w.ort()))[1], 2, "no onnx artifacts"),
    ("manifest-graph-deleted", 3, lambda w: (w.manifest(lambda m: m["artifacts"]["onnx"].pop("unet")),
                                             ("edit", w.ort()))[1], 2, "unet"),
    ("manifest-is-a-list", 5, lambda w: (w.manifest(lambda m: [m]), ("edit", w.ort()))[1], 2, "list"),
    ("manifest-not-json", 5, lambda w: ((w.artifacts / "manifest.json").write_text("{nope"),
                                        ("edit", w.ort()))[1], 2, "manifest.json"),
    ("manifest-missing", 5, lambda w: ((w.artifacts / "manifest.json").unlink(), ("edit", w.ort()))[1], 2,
     "manifest"),
    ("artifacts-is-a-file", 5, lambda w: ("edit", w.edit("--backend", "onnxruntime", "--artifacts", w.image)), 2,
     "in.png"),
    ("artifacts-without-folder", 5, lambda w: ("edit", w.edit("--backend", "onnxruntime")), 2, "--artifacts"),
    ("artifacts-of-another-model", 3, lambda w: ("edit", w.edit("--backend", "onnxruntime", "--artifacts",
                                                                 w.artifacts)), 2, "exported from"),
    ("garbage-onnx-with-matching-hash", 3, lambda w: (
        (w.artifacts / "onnx" / "unet.onnx").write_bytes(b"\x08garbage" * 64),
        w.manifest(lambda m: _retarget(m, "onnx/unet.onnx", b"\x08garbage" * 64)),
        ("edit", w.ort()))[2], 2, "unet"),
    ("aoti-bit-flip", 3, lambda w: (_flip_bit(_aoti(w) / "aoti" / "unet.pt2"), ("edit", w.aoti()))[1], 2, "sha256"),
    ("aoti-garbage-package-with-matching-hash", 3, lambda w: (
        (_aoti(w) / "aoti" / "unet.pt2").write_bytes(b"PK\x03\x04garbage" * 64),
        w.manifest(lambda m: _retarget(m, "aoti/unet.pt2", b"PK\x03\x04garbage" * 64, target="aoti"),
                   folder=w.root / "aoti"),
        ("edit", w.aoti()))[2], 2, "unet.pt2"),
    ("verify-garbage-onnx-with-matching-hash", 3, lambda w: (
        (w.artifacts / "onnx" / "unet.onnx").write_bytes(b"\x08garbage" * 64),
        w.manifest(lambda m: _retarget(m, "onnx/unet.onnx", b"\x08garbage" * 64)),
        ("verify", [w.artifacts, "--preset", "tiny", "--random-weights"]))[2], 1, "unet"),
    ("verify-graph-deleted", 3, lambda w: (w.manifest(lambda m: m["artifacts"]["onnx"].pop("unet")),
                                           ("verify", [w.artifacts, "--preset", "tiny", "--random-weights"]))[1], 1, "unet"),
    ("verify-path-escapes", 3, lambda w: (w.manifest(lambda m: _retarget(m, "../../../../etc/passwd")),
                                          ("verify", [w.artifacts]))[1], 2, "outside"),
    ("verify-manifest-list", 5, lambda w: (w.manifest(lambda m: [m]), ("verify", [w.artifacts]))[1], 2, "list"),
    ("verify-while-an-export-writes", 4, lambda w: (_hold_lock(w.artifacts), ("verify", [w.artifacts]))[1], 1,
     "in use by another smartedit-export (pid 4242"),
    ("verify-missing-folder", 5, lambda w: ("verify", [w.root / "nowhere"]), 2, "nowhere"),
    ("verify-widened-profile", 6, lambda w: (w.manifest(lambda m: m["artifacts"]["onnx"]["unet"]["spec"]["dims"]["h8"]
                                                       .__setitem__("max", 10**6)),
                                             ("verify", [w.artifacts, "--preset", "tiny", "--random-weights"]))[1], 2, "limit"),
    # 5: one clear line for a broken model folder
    ("config-missing", 5, lambda w: ((w.model / "config.json").unlink(), ("edit", w.edit()))[1], 2, "config.json"),
    ("config-not-json", 5, lambda w: ((w.model / "config.json").write_text("{,"), ("edit", w.edit()))[1], 2,
     "config.json"),
    ("config-not-utf8", 5, lambda w: ((w.model / "config.json").write_bytes(b"\xff\xfe{"), ("edit", w.edit()))[1],
     2, "config.json"),
    ("config-a-list", 5, lambda w: ((w.model / "config.json").write_text("[]"), ("edit", w.edit()))[1], 2,
     "config.json"),
    ("config-layers-a-word", 5, lambda w: (w.config(lambda d: d["llm"].__setitem__("num_layers", "two")),
                                           ("edit", w.edit()))[1], 2, "num_layers"),
    ("config-unknown-field", 5, lambda w: (w.config(lambda d: d["llm"].__setitem__("num_layerz", 2)),
                                           ("edit", w.edit()))[1], 2, "num_layerz"),
    ("config-hidden-size-huge", 6, lambda w: (w.config(lambda d: d["llm"].__setitem__("hidden_size", 10**9)),
                                              ("edit", w.edit()))[1], 2, "hidden_size"),
    ("config-negative-layers", 6, lambda w: (w.config(lambda d: d["unet"].__setitem__("layers_per_block", -1)),
                                             ("edit", w.edit()))[1], 2, "layers_per_block"),
    ("config-7b-over-tiny-weights", 6, lambda w: (w.config(lambda d: d.update(
        {k: v for k, v in _preset_dict("7b").items() if k != "name"})), ("edit", w.edit()))[1], 2, "shape"),
    ("weights-header-huge", 5, lambda w: ((w.model / "unet.safetensors").write_bytes(struct.pack("<Q", 2**62)),
                                          ("edit", w.edit()))[1], 2, "unet.safetensors"),
    ("weights-offsets-past-end", 5, lambda w: (_safetensors_header(
        w.model / "unet.safetensors", {"conv_out.weight": {"dtype": "F32", "shape": [4, 320, 3, 3],
                                                           "data_offsets": [0, 46080]}}, b"\0" * 16),
        ("edit", w.edit()))[1], 2, "unet.safetensors"),
    ("weights-shape-overflow", 5, lambda w: (_safetensors_header(
        w.model / "unet.safetensors", {"conv_out.weight": {"dtype": "F32", "shape": [2**40, 2**24],
                                                           "data_offsets": [0, 16]}}, b"\0" * 16),
        ("edit", w.edit()))[1], 2, "unet.safetensors"),
    ("weights-truncated", 5, lambda w: ((w.model / "unet.safetensors").write_bytes(
        (w.model / "unet.safetensors").read_bytes()[:1000]), ("edit", w.edit()))[1], 2, "unet.safetensors"),
    ("weights-raw-pickle", 5, lambda w: (torch.save({"x": torch.zeros(1)}, w.model / "unet.safetensors"),
                                         ("edit", w.edit()))[1], 2, "unet.safetensors"),
    ("weights-wrong-dtype", 5, lambda w: (w.weights("unet", lambda sd: sd.update(
        {k: v.to(torch.int32) for k, v in sd.items() if k == "unet.conv_out.weight"})), ("edit", w.edit()))[1], 2,
     "conv_out.weight"),
    ("weights-missing", 5, lambda w: ((w.model / "unet.safetensors").unlink(), ("edit", w.edit()))[1], 2,
     "unet.safetensors"),
    ("null-text-wrong-key", 5, lambda w: (save_file({"embeds": torch.zeros(1, 77, 64)},
                                                    w.model / "null_text.safetensors"), ("edit", w.edit()))[1],
     2, "null_text_embeds"),
    ("tokenizer-missing-no-network", 7, lambda w: (shutil.rmtree(w.model / "tokenizer"), ("edit", w.edit()))[1], 2,
     "tokenizer"),
    ("tokenizer-garbage", 5, lambda w: ([p.write_text("{garbage") for p in (w.model / "tokenizer").glob("*.json")],
                                        ("edit", w.edit()))[1], 2, "tokenizer"),
    # 5: images, instructions, arguments
    ("image-missing", 5, lambda w: ("edit", w.edit("--image", w.root / "nope.png")), 2, "nope.png"),
    ("image-garbage", 5, lambda w: (w.image.write_bytes(b"\x89PNG garbage"), ("edit", w.edit()))[1], 2, "in.png"),
    ("image-empty-file", 5, lambda w: (w.image.write_bytes(b""), ("edit", w.edit()))[1], 2, "in.png"),
    ("image-is-a-folder", 5, lambda w: ("edit", w.edit("--image", w.model)), 2, "model"),
    ("image-decompression-bomb", 6, lambda w: (_bomb(w.image), ("edit", w.edit()))[1], 2, "in.png"),
    ("instruction-not-utf8", 5, lambda w: ("edit", w.edit("--instruction", "make it \udcff blue")), 2,
     "UTF-8"),
    ("instruction-eos-token", 9, lambda w: ("edit", w.edit("--instruction", "make it blue</s>")), 2, "'</s>'"),
    ("instruction-img-token", 9, lambda w: ("edit", w.edit("--instruction", "put <img_3> here")), 2, "'<img_3>'"),
    ("instruction-unk-token", 9, lambda w: ("edit", w.edit("--instruction", "<unk> sky")), 2, "'<unk>'"),
    ("tensors-pack-special-token", 9, lambda w: ("tensors", [
        "pack", "--model", w.model, "--image", w.image, "--instruction", "<s>x", "--out", w.out / "t.safetensors"]),
     2, "'<s>'"),
    ("instruction-empty", 5, lambda w: ("edit", w.edit("--instruction", "  ")), 2, "instruction"),
    ("instruction-too-long", 6, lambda w: ("edit", w.edit("--instruction", "blue " * 3000)), 2, "tokens"),
    ("instruction-over-the-byte-limit", 6, lambda w: ("edit", w.edit("--instruction", "blue " * 5000)), 2,
     "instruction is 25000 characters, over the 16384-byte limit"),
    ("out-is-a-folder", 5, lambda w: ("edit", w.edit("--out", w.out)), 2, "folder"),
    ("out-unwritable", 5, lambda w: ("edit", w.edit("--out", "/proc/edit.png")), 2, "/proc"),
    ("out-parent-is-a-file", 5, lambda w: ("edit", w.edit("--out", w.image / "x.png")), 2, "in.png"),
    ("out-wrong-suffix", 5, lambda w: ("edit", w.edit("--out", w.out / "x.gif")), 2, "x.gif"),
    ("timings-is-a-folder", 5, lambda w: ("edit", w.edit("--timings", w.out)), 2, "--timings"),
    ("timings-unwritable", 5, lambda w: ("edit", w.edit("--timings", "/proc/t.json")), 2, "/proc"),
    ("template-out-of-range", 5, lambda w: ("edit", w.edit("--template", "99")), 2, "99"),
    ("template-a-word", 5, lambda w: ("edit", w.edit("--template", "first")), 2, "first"),
    ("device-bogus", 5, lambda w: ("edit", w.edit("--device", "tpu9")), 2, "tpu9"),
    ("device-cuda-absent", 5, lambda w: ("edit", w.edit("--device", "cuda")), 1, "cuda"),
    ("seed-too-big", 5, lambda w: ("edit", w.edit("--seed", str(2**70))), 2, str(2**70)),
    ("warmup-negative", 5, lambda w: ("edit", w.edit("--warmup", "-1")), 2, "-1"),
    ("model-folder-missing", 5, lambda w: ("edit", w.edit(model=w.root / "nomodel")), 2, "nomodel"),
    ("model-is-a-file", 5, lambda w: ("edit", w.edit(model=w.image)), 2, "in.png"),
    # 6: bounded work
    ("steps-huge", 6, lambda w: ("edit", w.edit("--steps", "1000000000")), 2, "1000000000"),
    ("resolution-huge", 6, lambda w: ("edit", w.edit("--resolution", "65536")), 2, "65536"),
    ("resolution-not-a-multiple", 6, lambda w: ("edit", w.edit("--resolution", "100")), 2, "100"),
    ("resolution-zero", 6, lambda w: ("edit", w.edit("--resolution", "0")), 2, "resolution"),
    # convert
    ("convert-release-missing", 5, lambda w: ("convert", _convert(w, w.out / "m")[:0] + [
        w.root / "norelease", w.out / "m", "--preset", "tiny", "--llava", w.release / "llava", "--ip2p",
        w.release / "ip2p"]), 2, "norelease"),
    ("convert-null-text-wrong-key", 5, lambda w: (
        save_file({"a": torch.zeros(1, 77, 64), "b": torch.zeros(1)}, w.root / "null.safetensors"),
        ("convert", _convert(w, w.out / "m", "--null-text", w.root / "null.safetensors")))[1], 2, "null.safetensors"),
    ("convert-unsafe-pickle", 5, lambda w: (_evil_pickle(w.release / "llava" / "pytorch_model-00001-of-00002.bin"),
                                            ("convert", _convert(w, w.out / "m")))[1], 2, "pytorch_model-00001"),
    ("convert-step-absent", 5, lambda w: ("convert", _convert(w, w.out / "m", "--step", "999")), 2, "999"),
    # tensors
    ("tensors-png-garbage", 5, lambda w: ("tensors", ["png", w.image, w.out / "x.png"]), 2, "in.png"),
    ("tensors-pack-image-garbage", 5, lambda w: (w.image.write_bytes(b"nope"), ("tensors", [
        "pack", "--model", w.model, "--image", w.image, "--instruction", "x", "--out", w.out / "t.safetensors"]))[1],
     2, "in.png"),
    # 9: inputs mean what they say (round 2): an instruction that draws nothing, a batch of no images
    ("edit-instruction-invisible", 9, lambda w: ("edit", w.edit("--instruction", "\u200b\ufeff\u200e")), 2,
     "U+200B U+FEFF U+200E"),
    ("edit-instruction-blank-glyphs", 9, lambda w: ("edit", w.edit("--instruction", "\u3164 \u2800")), 2,
     "no visible character"),
    ("tensors-png-batch-of-0", 9, lambda w: (save_file({"image": torch.zeros(0, 3, 8, 8)}, w.root / "e.safetensors"),
                                             ("tensors", ["png", w.root / "e.safetensors", w.out / "x.png"]))[1],
     2, "a batch of 0 images"),
    # 5: a model folder's JSON is read within bounds (a RecursionError traceback before)
    ("config-nested-100k-deep", 5, lambda w: ((w.model / "config.json").write_text("[" * 100000 + "]" * 100000),
                                               ("edit", w.edit()))[1], 2, "nested deeper than 64 levels"),
    # 1: outputs never destroy files nobody named (NAME-i.png of batch item i)
    ("tensors-png-item-1-exists", 1, lambda w: (_existing(w, "x-1.png"), save_file(
        {"image": torch.zeros(3, 3, 8, 8)}, w.root / "three.safetensors"),
        ("tensors", ["png", w.root / "three.safetensors", w.root / "x.png"]))[2], 2, "x-1.png exists"),
    ("tensors-png-item-2-exists", 1, lambda w: (_existing(w, "x-2.png"), save_file(
        {"image": torch.zeros(3, 3, 8, 8)}, w.root / "three.safetensors"),
        ("tensors", ["png", w.root / "three.safetensors", w.root / "x.png"]))[2], 2, "--overwrite"),
    # 5 and 10: a value the parser accepts works or is refused before work
    ("bench-serve-two-backends", 10, lambda w: ("bench", _bench(w, "--serve", "--backends", "eager,onnxruntime")), 2,
     "one backend at one resolution"),
    ("bench-serve-two-resolutions", 10, lambda w: ("bench", _bench(w, "--serve", "--resolution", "64,128")), 2,
     "--resolution 64,128"),
    ("bench-serve-queue-delay-inf", 5, lambda w: ("bench", _bench(w, "--serve", "--max-queue-delay-ms", "inf")), 2,
     "--max-queue-delay-ms"),
    ("bench-serve-queue-delay-1e20", 5, lambda w: ("bench", _bench(w, "--serve", "--max-queue-delay-ms", "1e20")),
     2, "1e+20"),
    ("bench-serve-queue-delay-negative", 5, lambda w: ("bench", _bench(w, "--serve", "--max-queue-delay-ms=-1")), 2,
     "-1"),
    # 10: the benchmark refuses what it cannot measure, before it measures
    ("bench-steps-zero", 10, lambda w: ("bench", _bench(w, "--steps", "0")), 2, "--steps"),
    ("bench-repeats-zero", 10, lambda w: ("bench", _bench(w, "--repeats", "0")), 2, "--repeats"),
    ("bench-batch-zero", 10, lambda w: ("bench", _bench(w, "--batch", "0")), 2, "--batch"),
    ("bench-resolution-zero", 10, lambda w: ("bench", _bench(w, "--resolution", "0")), 2, "0"),
    ("bench-unknown-backend", 10, lambda w: ("bench", _bench(w, "--backends", "eager,warp")), 2, "warp"),
    ("bench-warmup-negative", 10, lambda w: ("bench", _bench(w, "--warmup", "-1")), 2, "--warmup"),
]


_HELD: list[int] = []  # lock descriptors kept open while a row's command runs


def _hold_lock(folder: Path) -> None:
    """Take the export lock as a running smartedit-export would (flock is per open file, so this process's own
    command then finds it held)."""
    import fcntl

    fd = os.open(folder / ".smartedit-export.lock", os.O_RDWR | os.O_CREAT, 0o666)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"program": "smartedit-export", "pid": 4242, "host": "here"}).encode())
    _HELD.append(fd)


def _aoti(w: W) -> Path:
    """A copy of the tiny preset's AOTInductor export (fp32, CPU) in this row's workspace."""
    w.inputs.append(_copy(w.pristine_aoti, w.root / "aoti"))
    return w.root / "aoti"


def _existing(w: W, name: str) -> Path:
    """A file of the user's beside the output, which no flag names."""
    (w.root / name).write_bytes(b"the user's own picture")
    w.inputs.append(w.root / name)
    return w.root / name


def _retarget(m: dict, path: str, data: bytes | None = None, target: str = "onnx") -> None:
    """Point the manifest's unet entry at `path` (and, given `data`, at that content's size and sha256)."""
    files = m["artifacts"][target]["unet"]["files"]
    (old,) = files
    files[path] = files.pop(old)
    if data is not None:
        files[path].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))


def _preset_dict(name: str) -> dict:
    from smartedit.config import SmartEditConfig

    return SmartEditConfig.from_name(name).to_dict()


def _other_model(w: W) -> Path:
    """The same tiny model with one weight changed and saved as another folder (another config.json hash)."""
    other = w.root / "other"
    shutil.copytree(w.model, other)
    d = json.loads((other / "config.json").read_text())
    d["source"] = {"note": "another model"}
    (other / "config.json").write_text(json.dumps(d))
    w.inputs.append(other)
    return other


def _bomb(path: Path) -> None:
    """A PNG whose header claims 60000x60000 px (3.6 G pixels): PIL's decompression-bomb limit refuses it."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
                     + chunk(b"IEND", b""))


def _evil_pickle(path: Path) -> None:
    """A .bin whose unpickling would run os.system: weights_only loading must refuse it."""
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /tmp/smartedit-pwned",))

    path.write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))


# -- fixtures ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, onnx_export, aoti_export):
    from smartedit.pipeline import SmartEditPipeline
    from smartedit.testing import write_official_release

    root = tmp_path_factory.mktemp("reliability")
    pipe = SmartEditPipeline.from_preset("tiny", seed=0)
    pipe.save_pretrained(root / "model")
    write_official_release(pipe, root / "release")
    rng = np.random.RandomState(0)
    Image.fromarray((rng.rand(96, 128, 3) * 255).astype(np.uint8)).save(root / "in.png")
    return {"model": root / "model", "release": root / "release", "image": root / "in.png",
            "artifacts": onnx_export("fp32"), "aoti": aoti_export}


def _copy(src: Path, dst: Path) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    else:
        shutil.copy2(src, dst)
    return dst


# what the tools record beside a manifest by design: verify's result, the lock file's last holder
OWN_RECORDS = {"verify.json", ".smartedit-export.lock"}


def _snapshot(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under `paths` (links not followed), to show a failed command changed none of them."""
    out = {}
    for p in paths:
        for f in ([p] if not p.is_dir() else sorted(p.rglob("*"))):
            if f.name in OWN_RECORDS:
                continue
            if f.is_symlink():
                out[str(f)] = "-> " + os.readlink(f)
            elif f.is_file():
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def _no_network(*_a, **_k):
    raise AssertionError("a command tried to open a network connection")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(case, pristine, tmp_path, capsys, monkeypatch):
    name, principle, prepare, code, names = case
    monkeypatch.setattr(socket.socket, "connect", _no_network)  # 7: never the network
    w = W(root=tmp_path, model=_copy(pristine["model"], tmp_path / "model"),
          release=_copy(pristine["release"], tmp_path / "release"), image=_copy(pristine["image"], tmp_path / "in.png"),
          artifacts=_copy(pristine["artifacts"], tmp_path / "artifacts"), out=tmp_path / "out",
          pristine_aoti=pristine["aoti"])
    w.out.mkdir()
    cli, argv = prepare(w)
    w.inputs += [w.model, w.release, w.image, w.artifacts]
    before = _snapshot(w.inputs)
    try:
        status, _, err = run_cli(_cli(cli), argv, capsys)
    finally:
        while _HELD:
            os.close(_HELD.pop())

    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if ": error:" in line]
    assert len(errors) == 1, f"want one error line, stderr was:\n{err}"
    assert names in errors[0], f"the error line should name {names!r}: {errors[0]}"
    assert status == code, f"exit status {status}, want {code}: {errors[0]}"
    assert _snapshot(w.inputs) == before, "an input changed"
    left = sorted(str(p.relative_to(w.out)) for p in w.out.rglob("*"))
    assert not left, f"a refused command left {left} in its output folder"
    assert not list(tmp_path.rglob("*.tmp-*")), "half-written leftovers"
    assert not Path("/tmp/smartedit-pwned").exists()


def test_catalogue_covers_every_principle():
    assert len(CASES) >= 60
    assert {c[1] for c in CASES} >= {1, 2, 3, 4, 5, 6, 7, 9, 10}
    assert len({c[0] for c in CASES}) == len(CASES)


def test_16_bit_png_means_its_values(tmp_path):
    """9: a 16-bit greyscale PNG (PIL mode I;16) is read by value (x 255/65535), not clipped to white by PIL's
    convert("RGB"). Reference: the same picture quantised to 8 bits with numpy, read as an ordinary PNG."""
    from smartedit.vae import preprocess_vae
    from smartedit.vision import preprocess_clip

    ramp = (np.arange(96 * 128).reshape(96, 128) * 5).astype(np.uint16)  # 0 .. 61435
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    Image.fromarray(np.rint(ramp / 257.0).astype(np.uint8)).convert("RGB").save(tmp_path / "ref.png")
    deep, ref = Image.open(tmp_path / "deep.png"), Image.open(tmp_path / "ref.png")
    assert deep.mode.startswith("I")
    assert torch.equal(preprocess_vae([deep], 64), preprocess_vae([ref], 64))
    assert torch.equal(preprocess_clip([deep]), preprocess_clip([ref]))
    assert float((preprocess_vae([deep], 64) > 0.99).float().mean()) < 0.05  # was 99.3% white


def test_disk_full_leaves_nothing(pristine, tmp_path, capsys):
    """5/4: an edit whose output disk fills up fails with one line (exit 1) and leaves no file, not even a
    half-written temporary one. Needs a 1 MiB tmpfs (root, or CAP_SYS_ADMIN)."""
    import subprocess

    from smartedit.cli import edit_cli

    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN)")
    try:
        with open(disk / "filler", "wb", buffering=0) as f:  # fill it, leaving no block for the PNG
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError:
                pass
        status, _, err = run_cli(edit_cli, ["--model", pristine["model"], "--image", pristine["image"],
                                            "--instruction", "make it blue", "--out", disk / "edit.png",
                                            "--steps", "1", "--resolution", "64", "--quiet"], capsys)
        errors = [line for line in err.splitlines() if ": error:" in line]
        assert status == 1 and len(errors) == 1 and "No space left" in errors[0], err
        assert "Traceback" not in err
        assert sorted(p.name for p in disk.iterdir()) == ["filler"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_outputs_honour_the_umask(tmp_path):
    """8: a model folder and an atomically written file get the modes an ordinary open()/mkdir() would (0644 /
    0755 under umask 022), not the private 0600 / 0700 of the temporary files they are written as."""
    from smartedit.files import write_atomic
    from smartedit.pipeline import SmartEditPipeline

    old = os.umask(0o022)
    try:
        SmartEditPipeline.from_preset("tiny", seed=0).save_pretrained(tmp_path / "model")
        write_atomic(tmp_path / "out.png", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.png").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "model").rglob("*") if p.is_file()} == {0o644}


def test_every_seed_the_parser_takes_draws_a_preset(tmp_path, capsys):
    """5: --seed 2^63-1 is accepted by the parser, so the preset's weights must draw from it (its stage streams
    overflowed torch's signed 64-bit seed before); seeds up to 2^56 draw the weights they always did."""
    from smartedit.cli import edit_cli
    from smartedit.config import MAX_SEED, derived_seed

    Image.new("RGB", (64, 64), (10, 200, 30)).save(tmp_path / "in.png")
    code, out, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--seed", MAX_SEED, "--image",
                                        tmp_path / "in.png", "--instruction", "make it blue", "--steps", "1",
                                        "--resolution", "64", "--out", tmp_path / "o.png", "--quiet"], capsys)
    assert code == 0 and (tmp_path / "o.png").is_file(), err
    assert [derived_seed(s, i) for s, i in ((0, 0), (7, 99), (2**56, 5))] == [0, 799, 2**56 * 100 + 5]


def test_an_exif_rotated_photo_is_upright_for_every_stage(tmp_path):
    """9: a JPEG stored sideways with an EXIF orientation (as phones write them) is seen upright by the CLIP and the
    VAE preprocessing alike: both equal the same picture stored upright."""
    from smartedit.vae import preprocess_vae
    from smartedit.vision import preprocess_clip

    upright = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype(np.uint8))
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "sideways.png", exif=exif)
    a, b = Image.open(tmp_path / "upright.png"), Image.open(tmp_path / "sideways.png")
    assert b.size == (64, 96)
    assert torch.equal(preprocess_clip([b]), preprocess_clip([a]))
    assert torch.equal(preprocess_vae([b], 64), preprocess_vae([a], 64))
