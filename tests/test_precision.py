"""A precision is one row of smartedit.config.PRECISIONS: the commands' choices, the checks and their messages, the
export job's entries and the readers of a manifest all take it from there (no export here: each test is cheap)."""

import re

import pytest
import torch

from conftest import run_cli
from smartedit.config import PRECISIONS, SmartEditConfig, dtype_named
from smartedit.errors import ArtifactError, InputError
from smartedit.graphs import graph_table
from smartedit.graphs.manifest import Entry, Manifest
from smartedit.graphs.spec import ProfileOptions
from smartedit.weights import ModelSource


def _choices(main, capsys) -> set[str]:
    """The --precision choices a command's --help lists."""
    code, out, _ = run_cli(main, ["--help"], capsys)
    assert code == 0
    return set(re.search(r"--precision \{([^}]*)\}", out).group(1).split(","))


def test_each_commands_precision_choices_are_the_tables_rows(capsys):
    from smartedit.bench.cli import main as bench_main
    from smartedit.cli import edit_cli
    from smartedit.export.cli import main as export_main
    from smartedit.serve.cli import main as serve_main

    exported = {n for n, p in PRECISIONS.items() if p.exported}
    run = {n for n, p in PRECISIONS.items() if not p.quantized}
    assert {"fp32", "fp16", "int8", "fp8"} <= exported and "bf16" not in exported  # a new row adds itself
    assert {"fp32", "fp16", "bf16"} <= run and not {"int8", "fp8"} & run
    assert _choices(export_main, capsys) == exported
    for main in (edit_cli, bench_main, serve_main):  # what a pipeline runs in: quantizing nothing
        assert _choices(main, capsys) == run


def test_a_quantized_precision_is_its_unquantized_dtype_at_the_graphs_edges():
    for name in ("int8", "fp8"):
        p = PRECISIONS[name]
        assert p.quantized and p.dtype == torch.float16 and p.unquantized is PRECISIONS["fp16"]
    unet = graph_table(SmartEditConfig.from_name("tiny"), ProfileOptions())["unet"].spec
    sample = unet.inputs[0]
    assert [sample.torch_dtype(n) for n in ("fp32", "int8", "fp8")] == [torch.float32, torch.float16, torch.float16]
    assert PRECISIONS["fp8"].min_capability == 89 and PRECISIONS["fp8"].calibrators == ("max",)
    assert PRECISIONS["int8"].calibrators[0] == "entropy" and PRECISIONS["int8"].min_capability is None


def test_errors_name_the_bad_precision(tmp_path, capsys):
    from smartedit.export.cli import main as export_main
    from smartedit.export.run import run_export

    with pytest.raises(InputError, match="unknown precision 'int3'"):
        run_export(tmp_path / "a", ModelSource(preset="tiny"), precision="int3", progress=lambda m: None)
    with pytest.raises(InputError, match="--precision bf16 is not exported"):
        run_export(tmp_path / "b", ModelSource(preset="tiny"), precision="bf16", progress=lambda m: None)
    with pytest.raises(InputError, match=r"--target aoti takes --precision fp32 or fp16; int8, fp8"):
        run_export(tmp_path / "c", ModelSource(preset="tiny"), precision="int8", target="aoti", progress=lambda m: None)
    assert not any((tmp_path / d).exists() for d in "abc")
    code, _, err = run_cli(export_main, ["--preset", "tiny", "--random-weights", "--precision", "int3", "--out",
                                         tmp_path / "d"], capsys)
    assert code == 2 and "'int3'" in err
    with pytest.raises(InputError, match="unknown precision 'int8' to run in"):
        dtype_named("int8")


def _entry(precision: str, graph: str = "unet") -> Entry:
    spec = graph_table(SmartEditConfig.from_name("tiny"), ProfileOptions())[graph].spec
    return Entry("onnx", graph, "k", spec, {"precision": precision}, {}, source="s")


def test_a_manifest_entry_of_an_unknown_precision_is_refused_naming_it():
    d = _entry("fp16").to_dict()
    assert Entry.from_dict(d, "here").precision == "fp16"
    d["options"]["precision"] = "int3"
    with pytest.raises(ArtifactError, match=r"here: malformed manifest entry .*got 'int3'"):
        Entry.from_dict(d, "here")


def test_an_int8_export_job_records_int8_for_the_unet_and_fp16_for_the_rest(tmp_path):
    from smartedit.export.job import ExportJob
    from smartedit.export.quantize import QuantizeOptions

    cfg = SmartEditConfig.from_name("tiny")
    manifest = Manifest(tmp_path, {"sha256": "s"}, {})

    def job(name: str) -> ExportJob:
        return ExportJob(target="onnx", out=tmp_path, source=None, cfg=cfg, graphs=graph_table(cfg, ProfileOptions()),
                         names=["llava", "unet"], manifest=manifest, report={}, precision=PRECISIONS[name], opset=18,
                         profile=ProfileOptions(), fold_cfg=False, verify=False, progress=lambda m: None,
                         quantize=QuantizeOptions(name) if PRECISIONS[name].quantized else None)

    int8, fp8, fp16 = job("int8"), job("fp8"), job("fp16")
    assert [int8.entry_options(g)["precision"] for g in ("unet", "llava")] == ["int8", "fp16"]
    assert fp16.entry_options("unet")["precision"] == "fp16"
    assert int8.key("llava") == fp16.key("llava")  # the graphs it does not quantize are the fp16 export's
    assert len({int8.key("unet"), fp8.key("unet"), fp16.key("unet")}) == 3
    refused = Entry("onnx", "unet", "k", _entry("int8").spec, {"precision": "int8"}, {}, verified=False).refused()
    assert "quality report fell below --min-psnr" in refused


def test_readers_take_onnx_runtimes_optimisation_level_from_the_entrys_row(monkeypatch):
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install -e '.[test]')")
    from tritonclient.grpc import model_config_pb2 as mc

    from smartedit.engines import onnxruntime as ort_backend
    from smartedit.export.triton import graph_model_config

    for name, basic in (("fp16", False), ("int8", False), ("fp8", True)):
        c = graph_model_config(_entry(name), "onnx")
        assert (c.optimization.graph.level == -1) is basic, name
        assert [i.data_type for i in c.input if i.name == "sample"] == [mc.DataType.Value("TYPE_FP16")], name
        python = graph_model_config(_entry(name), "python")
        assert python.parameters["precision"].string_value == name
        opened = {}
        monkeypatch.setattr(ort_backend, "session", lambda path, providers, basic: opened.setdefault("basic", basic))
        runner = ort_backend.OnnxRuntimeRunner.__new__(ort_backend.OnnxRuntimeRunner)
        runner.providers = ["CPUExecutionProvider"]
        runner.open("unet.onnx", _entry(name))
        assert opened["basic"] is basic, name
