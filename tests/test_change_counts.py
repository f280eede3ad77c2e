"""The README's "What a change touches", measured: each change is made in a scratch copy of the package (a graph, a
named dimension, an edit default), the files it touched are counted, and the change is checked to work there (the
scratch copy imported in a subprocess). The numbers asserted are the README's own, parsed from its lines."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
COPIED = ("smartedit", "runtime")  # what a change may touch; README.md stays where it is (it is what is checked)


def readme_count(bullet: str) -> tuple[int, int]:
    """The (low, high) count of the README's "What a change touches" line starting `bullet` ("(3-5)" -> (3, 5))."""
    text = README.read_text().split("What a change touches", 1)[1].split("\n\n", 1)[0]
    lines = [" ".join(b.split()) for b in re.split(r"\n- ", text)[1:]]
    line = next((b for b in lines if b.startswith(bullet)), None)
    assert line is not None, f"README.md has no 'What a change touches' line starting {bullet!r}"
    m = re.search(r"\((\d+)(?:-(\d+))?\)", line)
    assert m, f"README.md's line {line!r} gives no (N) or (N-M) count"
    return int(m.group(1)), int(m.group(2) or m.group(1))


class Scratch:
    """A copy of the package under `root`; `change` applies edits and returns the files they touched."""

    def __init__(self, root: Path):
        self.root = root
        for name in COPIED:
            shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "build*"))

    def _hashes(self) -> dict[str, str]:
        return {str(p.relative_to(self.root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(self.root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}

    def change(self, edits: list[tuple[str, Callable[[str], str]]]) -> set[str]:
        before = self._hashes()
        for rel, edit in edits:
            p = self.root / rel
            p.write_text(edit(p.read_text() if p.exists() else ""))
        after = self._hashes()
        return {f for f in after if before.get(f) != after[f]} | (set(before) - set(after))

    def python(self, code: str) -> str:
        env = {**os.environ, "PYTHONPATH": str(self.root), "OMP_NUM_THREADS": "1"}
        r = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=self.root, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout


def replace(old: str, new: str) -> Callable[[str], str]:
    def edit(text: str) -> str:
        assert text.count(old) == 1, f"expected {old!r} once (the README's recipe no longer matches the code?)"
        return text.replace(old, new)

    return edit


def after(anchor: str, added: str) -> Callable[[str], str]:
    return replace(anchor, anchor + added)


# a graph of the VAE round trip: image [B,3,8h,8w] -> image [B,3,8h,8w]
METHOD = '''
    def vae_roundtrip(self, image: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(self.vae.encode(image))
'''
SPEC = '''"""`vae_roundtrip` graph: image [B,3,8h,8w] -> the VAE's decoding of its encoding."""

from smartedit.config import SmartEditConfig

from .spec import GraphSpec, ProfileOptions, TensorSpec

METHOD, STAGES = "vae_roundtrip", ("vae",)


def spec(cfg: SmartEditConfig, opts: ProfileOptions) -> GraphSpec:
    f = cfg.vae.downsample_factor
    return GraphSpec(
        name="vae_roundtrip",
        inputs=(TensorSpec("image", "float", ("B", 3, f"{f}*h", f"{f}*w"), values="image"),),
        outputs=(TensorSpec("decoded", "float", ("B", 3, f"{f}*h", f"{f}*w")),),
        dims={"B": opts.batch(), "h": opts.latent(), "w": opts.latent()},
    )
'''
GRAPH_LINE = '''
    "vae_roundtrip": GraphFacts(lambda c, o, f, k: vae_roundtrip.spec(c, o), lambda f: vae_roundtrip.METHOD,
                                vae_roundtrip.STAGES, "vae_roundtrip"),'''
PIPELINE_CALL = '''
    def roundtrip(self, image: torch.Tensor) -> torch.Tensor:
        return self.runner.run("vae_roundtrip", {"image": image})["decoded"]
'''
CHECK_GRAPH_AND_DIM = """
    import torch
    from types import SimpleNamespace
    from smartedit.config import SmartEditConfig
    from smartedit.errors import InputError
    from smartedit.graphs import GRAPH_NAMES, EagerRunner, graph_table
    from smartedit.model import build_stages
    from smartedit.pipeline import SmartEditPipeline

    cfg = SmartEditConfig.from_name("tiny")
    g = graph_table(cfg)["vae_roundtrip"]
    assert "vae_roundtrip" in GRAPH_NAMES and g.method == "vae_roundtrip" and set(g.spec.dims) == {"N", "h", "w"}, g
    runner = EagerRunner(build_stages(cfg, only=["vae"], seed=0), cfg)
    point = dict(g.spec.point("min"), N=2)
    out = runner.run("vae_roundtrip", g.spec.sample_inputs(point))["decoded"]
    assert tuple(out.shape) == g.spec.shape(g.spec.outputs[0], point), out.shape
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    assert SmartEditPipeline.roundtrip(SimpleNamespace(runner=runner), x).shape == x.shape
    try:
        g.spec.check_inputs({"image": torch.zeros(5, 3, 64, 64)})
    except InputError as e:
        assert "dimension N = 5" in str(e) and "--max-batch" in str(e), e
    else:
        raise AssertionError("5 images passed the default profile's range of 1-4")
"""
STEPS = 37  # a new default number of steps
CHECK_DEFAULT = f"""
    import argparse, inspect

    class Parsed(Exception):
        pass

    def parser_of(main):
        def stop(self, *a, **k):
            raise Parsed(self)
        argparse.ArgumentParser.parse_args, keep = stop, argparse.ArgumentParser.parse_args
        try:
            main([])
        except Parsed as p:
            return p.args[0]
        finally:
            argparse.ArgumentParser.parse_args = keep

    from smartedit.bench.cli import main as bench_cli
    from smartedit.bench.run import run_bench
    from smartedit.bench.settings import Setting
    from smartedit.cli import edit_cli
    from smartedit.serve.service import DEFAULTS

    found = {{"smartedit-edit --steps": parser_of(edit_cli).get_default("steps"),
             "smartedit-bench --steps": parser_of(bench_cli).get_default("steps"),
             "SmartEditPipeline()": inspect.signature(SmartEditPipeline.__call__).parameters["steps"].default,
             "SmartEditPipeline.plan": inspect.signature(SmartEditPipeline.plan).parameters["steps"].default,
             "run_bench": inspect.signature(run_bench).parameters["steps"].default,
             "Setting": Setting().steps, "the server's requests": DEFAULTS["steps"]}}
    wrong = {{k: v for k, v in found.items() if v != {STEPS}}}
    assert not wrong, wrong
"""


@pytest.fixture(scope="module")
def touched(tmp_path_factory) -> dict[str, set[str]]:
    """The files each change touched, the changes made one after the other in one scratch copy (the named dimension
    is the new graph's), then all of them checked to work there, in one subprocess (the C++ header is not built)."""
    s = Scratch(tmp_path_factory.mktemp("scratch"))
    out = {}
    out["graph"] = s.change([  # a graph that the export, the runners and the benchmarks know
        ("smartedit/model.py", after("        return self.vae.decode(latents)\n", METHOD)),
        ("smartedit/graphs/vae_roundtrip.py", lambda _: SPEC),
        ("smartedit/graphs/__init__.py", replace("from . import llava, qformer_bim, unet, vae\n",
                                                 "from . import llava, qformer_bim, unet, vae, vae_roundtrip\n")),
        ("smartedit/graphs/__init__.py", after('                              "vae_decode"),', GRAPH_LINE)),
    ])
    out["called"] = out["graph"] | s.change([("smartedit/pipeline.py", after(
        '        return self.runner.run("vae_decoder", {"latents": latents})["image"]  # [B, 3, H, W]\n',
        PIPELINE_CALL))])
    out["dim"] = s.change([  # N, images round-tripped, in place of B
        ("smartedit/graphs/spec.py", after('    "Ls": DimMeaning("prompt tokens after the image", "--max-prompt"),\n',
                                           '    "N": DimMeaning("images round-tripped", "--max-batch"),\n')),
        ("smartedit/graphs/vae_roundtrip.py", lambda t: t.replace('("B", 3', '("N", 3').replace(
            'dims={"B": opts.batch(),', 'dims={"N": opts.batch(),')),
    ])
    out["default"] = s.change([
        ("smartedit/config.py", replace("DEFAULT_STEPS = 100\n", f"DEFAULT_STEPS = {STEPS}\n")),
        # the C++ runtime's own, for `denoise` (no manifest); its `edit` takes the manifest's (config.py's)
        ("runtime/include/smartedit/manifest.h", replace("int64_t steps = 100;", f"int64_t steps = {STEPS};")),
    ])
    s.python(CHECK_GRAPH_AND_DIM + CHECK_DEFAULT)
    return out


def test_a_graph_touches_what_the_readme_says(touched):
    low, high = readme_count("a graph:")
    assert len(touched["graph"]) == low, sorted(touched["graph"])
    # the one more: the C++ edit's call of it (runtime/src/editor.cpp), not built here
    assert len(touched["called"]) + 1 == high, sorted(touched["called"])


def test_a_named_dimension_touches_what_the_readme_says(touched):
    assert (len(touched["dim"]),) * 2 == readme_count("a named dimension:"), sorted(touched["dim"])


def test_an_edit_default_touches_what_the_readme_says(touched):
    assert (len(touched["default"]),) * 2 == readme_count("an edit default"), sorted(touched["default"])


def test_no_code_above_the_contract_names_a_graph():
    """What the README says a graph's line in GRAPHS is enough for: the packages above the graph contract (engines,
    export, bench, serve, ...) hold no graph's name as a literal; they find graphs by role (graph_with_role)."""
    import ast

    from smartedit.graphs import GRAPHS

    found = []
    for p in sorted((ROOT / "smartedit").glob("*/**/*.py")):
        if p.relative_to(ROOT / "smartedit").parts[0] == "graphs":
            continue
        found += [f"{p.relative_to(ROOT)}:{n.lineno} {n.value!r}" for n in ast.walk(ast.parse(p.read_text()))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in GRAPHS]
    assert not found, found
