"""The contract in the middle: the graph table and its modules, the runner protocol, the manifest schema and its
checks, the backend registry and the export targets' table."""

import json
import os

import pytest
import torch

from smartedit.engines import registry
from smartedit.engines.cudagraph import CudaGraphRunner
from smartedit.errors import ArtifactError, InputError, UnavailableError
from smartedit.export.targets import TARGETS
from smartedit.graphs import (
    DEEPCACHE_GRAPHS,
    GRAPH_NAMES,
    EagerRunner,
    GraphRunner,
    LoopRunner,
    graph_table,
)
from smartedit.graphs.manifest import MANIFEST_VERSION, Entry, Manifest
from smartedit.graphs.spec import DimRange, GraphSpec, TensorSpec
from smartedit.weights import ModelSource


def test_each_graph_module_holds_only_the_stages_it_reads(tiny_pipe):
    table = graph_table(tiny_pipe.config)
    assert list(table) == list(GRAPH_NAMES) + list(DEEPCACHE_GRAPHS)
    for name, g in table.items():
        module = g.module(tiny_pipe.stages)
        prefixes = {k.split(".")[1] for k in module.state_dict()}
        assert prefixes == set(g.stages), (name, prefixes)
    folded = graph_table(tiny_pipe.config, fold_cfg=True)["unet"]
    with pytest.raises(InputError, match="needs the null-text embedding"):
        folded.module(tiny_pipe.stages)
    assert "null_text_embeds" in folded.module(tiny_pipe.stages, tiny_pipe.null_text_embeds).state_dict()


def test_runners_implement_the_declared_protocol(tiny_pipe):
    eager = EagerRunner(tiny_pipe.stages, tiny_pipe.config)
    assert isinstance(eager, GraphRunner) and not isinstance(eager, LoopRunner)
    assert isinstance(CudaGraphRunner(tiny_pipe.stages, tiny_pipe.config, capture="none"), LoopRunner)


def _entry(**requires) -> Entry:
    spec = GraphSpec("g", (TensorSpec("x", "float", ("B", 4)),), (TensorSpec("y", "float", ("B", 4)),),
                     {"B": DimRange(1, 1, 4)})
    return Entry("trt", "g", "k", spec, {"precision": "fp16"}, {}, requires=requires)


def test_compatible_names_the_difference():
    e = _entry(tensorrt="10.7.0", compute_capability=["86", "80"], device={"type": "cuda", "capability": "8.6",
                                                                           "name": "RTX A6000"})
    here = {"tensorrt": "10.7.0", "compute_capability": "80", "device": {"type": "cuda", "capability": "8.6",
                                                                         "name": "another name"}}
    assert e.compatible(here) is None  # a card's name does not matter, its architecture does
    assert "built for tensorrt 10.7.0; this machine has 10.8.0" in e.compatible(here | {"tensorrt": "10.8.0"})
    assert "compute_capability ['86', '80']; this machine has 90" in e.compatible(here | {"compute_capability": "90"})
    assert "device" in e.compatible(here | {"device": {"type": "cpu"}})
    assert _entry().compatible({}) is None


def _manifest(tmp_path, d) -> None:
    (tmp_path / "manifest.json").write_text(d if isinstance(d, str) else json.dumps(d))


@pytest.mark.parametrize("content, message", [
    (None, "manifest.json not found"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds a JSON list, not a dict"),
    ({"manifest_version": 1, "graphs": {}}, f"is manifest version 1, this smartedit reads version {MANIFEST_VERSION}"),
    ({"manifest_version": MANIFEST_VERSION, "artifacts": []}, "'artifacts' must map each target"),
    ({"manifest_version": MANIFEST_VERSION, "artifacts": {"onnx": {"unet": {"target": "onnx"}}}},
     r"\[onnx\]\[unet\]: malformed manifest entry"),
])
def test_manifests_that_cannot_be_read_are_named(tmp_path, content, message):
    if content is not None:
        _manifest(tmp_path, content)
    with pytest.raises(ArtifactError, match=message):
        Manifest.read(tmp_path)


def test_paths_from_a_manifest_stay_inside_its_folder(tmp_path):
    m = Manifest(tmp_path, {}, {})
    (tmp_path / "onnx").mkdir()
    assert m.file("onnx/unet.onnx") == (tmp_path / "onnx" / "unet.onnx").resolve()
    for rel in ("../../etc/passwd", "/etc/passwd", "onnx/../../outside"):
        with pytest.raises(ArtifactError, match="outside"):
            m.file(rel)
    os.symlink("/etc", tmp_path / "onnx" / "link")
    with pytest.raises(ArtifactError, match="outside"):
        m.file("onnx/link/passwd")


def test_the_registry_says_why_a_backend_cannot_run_here(onnx_export, tmp_path):
    art = onnx_export("fp16")
    assert set(registry.BACKENDS) == {"eager", "official", "cudagraph", "compile", "onnxruntime", "trt", "trt-rtx",
                                      "aoti"}
    assert registry.why_not("eager", "cpu") is None and registry.why_not("onnxruntime", "cpu", art) is None
    assert registry.why_not("cudagraph", "cpu") == "runs on cuda, not cpu"
    assert "pass --artifacts OUT" in registry.why_not("aoti", "cpu")
    assert registry.why_not("aoti", "cpu", art) == f"no aoti artifacts in {art} (smartedit-export --target aoti)"
    assert "not an smartedit-export output folder" in registry.why_not("onnxruntime", "cpu", tmp_path)
    src = ModelSource(preset="tiny")
    with pytest.raises(InputError, match="unknown backend 'fast'"):
        registry.load("fast", src)
    with pytest.raises(InputError, match="--backend cudagraph runs on cuda; --device is cpu"):
        registry.load("cudagraph", src, "cpu")
    with pytest.raises(InputError, match="--backend onnxruntime runs exported graphs: pass --artifacts OUT"):
        registry.load("onnxruntime", src)
    with pytest.raises(ArtifactError, match=r"exported from .*preset 'tiny'.*not from preset 'tiny' \(random weights, "
                                            r"seed 1\)"):
        registry.load("onnxruntime", ModelSource(preset="tiny", seed=1), artifacts=art)
    if not torch.cuda.is_available():
        with pytest.raises(UnavailableError, match="needs a CUDA GPU and there is none here"):
            registry.load("cudagraph", src, "cuda")


def test_every_export_target_has_a_runtime():
    runs = {b.target for b in registry.BACKENDS.values() if b.target}
    assert runs == {"onnx", "trt", "trt-rtx", "aoti"}
    assert {t for t in TARGETS if TARGETS[t].runtime} == {"triton"}  # runs in Triton Inference Server
    assert set(TARGETS) == runs | {"triton"}


def test_model_source_is_one_or_the_other(tmp_path):
    with pytest.raises(InputError, match="not both or neither"):
        ModelSource()
    with pytest.raises(InputError, match="not both or neither"):
        ModelSource(model=tmp_path, preset="tiny")
    with pytest.raises(InputError, match="unknown preset 'huge'"):
        ModelSource(preset="huge")
    a, b = ModelSource(preset="tiny").describe(), ModelSource(preset="tiny", seed=1).describe()
    assert a["sha256"] != b["sha256"] and ModelSource(preset="tiny").mismatch(a) is None
