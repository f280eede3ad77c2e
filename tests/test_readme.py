"""The README's Quickstart runs as written, from a fresh directory that has the repository's examples/ and models/:
its shell block (one edit, then the whole CPU demo: export, verify, edit with every CPU backend, bench) and its
Python snippet.
README and code cannot drift apart."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import readme_block
from PIL import Image

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _workdir(tmp_path: Path) -> Path:
    """A fresh directory with the repository's examples/ and models/, as a clone's root has them."""
    for name in ("examples", "models"):
        (tmp_path / name).symlink_to(EXAMPLES.parent / name)
    return tmp_path


def test_sample_image_is_what_its_script_renders():
    sys.path.insert(0, str(EXAMPLES))
    try:
        from render_sample import render
    finally:
        sys.path.remove(str(EXAMPLES))
    shipped = Image.open(EXAMPLES / "in.png")
    assert shipped.size == (256, 256) and list(render().getdata()) == list(shipped.convert("RGB").getdata())


def _seed_demo(trained_export, artifacts: Path) -> None:
    """The session's fp32 ONNX and AOTInductor export of the trained model (conftest's TRAINED_PROFILE is
    examples/demo.sh's PROFILE), copied where the demo's two exports would leave it. The demo then reuses them ("up to
    date, skipped"), as the README says it reuses an existing export; every other command of it runs in full.
    Exporting from scratch is tested in test_export_onnx.py and test_export_aoti.py."""
    shutil.copytree(trained_export, artifacts, ignore=shutil.ignore_patterns(".smartedit-export.lock"))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_quickstart_shell_block_runs_verbatim(tmp_path, trained_export):
    cwd = _workdir(tmp_path)
    _seed_demo(trained_export, cwd / "demo" / "artifacts")
    block = readme_block("bash examples/demo.sh demo/")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=cwd, capture_output=True, text=True,
                       timeout=2400)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-3000:]
    # the README's picture is what its command makes (up to another CPU's float rounding)
    assert np.abs(_pixels(cwd / "out.png") - _pixels(EXAMPLES / "shapes-edited.png")).max() <= 2
    for backend in ("eager", "official", "onnxruntime", "aoti"):
        assert Image.open(cwd / "demo" / f"edit-{backend}.png").size == (64, 64)
        assert f"edit with {backend}: demo/edit-{backend}.png" in r.stdout
    assert "all checks that could run passed" in r.stdout
    assert r.stdout.count("up to date, skipped") == 10, "the seeded exports were not reused"
    bench = list((cwd / "demo" / "bench").glob("*.md"))
    assert len(bench) == 1 and all(b in bench[0].read_text() for b in ("onnxruntime", "aoti"))
    assert "Traceback" not in r.stderr


def test_sample_pictures_are_what_their_commands_make():
    """examples/shapes.png is tools/synthetic_edits.py's held-out sample picture, pixel for pixel."""
    sys.path.insert(0, str(EXAMPLES.parent / "tools"))
    try:
        import synthetic_edits
    finally:
        sys.path.remove(str(EXAMPLES.parent / "tools"))
    drawn = synthetic_edits.render(synthetic_edits.scene(synthetic_edits.SAMPLE_SEED))
    assert (_pixels(EXAMPLES / "shapes.png") == np.asarray(drawn.convert("RGB"), dtype=np.int16)).all()


def test_quickstart_python_snippet_runs_as_pasted(tmp_path):
    cwd = _workdir(tmp_path)
    r = subprocess.run([sys.executable, "-c", readme_block("SmartEditPipeline.from_pretrained(\"models/tiny-shapes\")")], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Image.open(cwd / "out.png").size == (64, 64)
    assert (cwd / "tiny-model" / "config.json").is_file()
