"""smartedit-export --target onnx on the tiny preset: every graph, fp32 and fp16, checked in ONNX Runtime (through
Polygraphy)."""

import json
import os

import numpy as np
import pytest
import torch
from conftest import SMALL_PROFILE, assert_close, run_cli

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from smartedit.engines.artifacts import Artifacts  # noqa: E402
from smartedit.engines.onnxruntime import OnnxRuntimeRunner, run_file  # noqa: E402
from smartedit.errors import ExportError, InputError  # noqa: E402
from smartedit.export.lora import merge_lora  # noqa: E402
from smartedit.export.onnx import export_onnx  # noqa: E402
from smartedit.export.run import run_export  # noqa: E402
from smartedit.files import sha256_file  # noqa: E402
from smartedit.graphs import GRAPH_NAMES, graph_table, parse_graph_names  # noqa: E402
from smartedit.graphs.parity import compare, verification_points  # noqa: E402
from smartedit.graphs.spec import DimRange, GraphSpec, ProfileOptions, TensorSpec  # noqa: E402
from smartedit.weights import ModelSource

SMALL = ProfileOptions(**SMALL_PROFILE)


def _quiet(msg):
    pass


@pytest.fixture(scope="module", params=["fp16", "fp32"])
def exported(request, onnx_export):
    out = onnx_export(request.param)
    return request.param, out, json.loads((out / "manifest.json").read_text())


def test_every_graph_exports_checks_and_matches_pytorch(exported):
    precision, out, manifest = exported
    assert set(manifest["artifacts"]) == {"onnx"} and set(manifest["artifacts"]["onnx"]) == set(GRAPH_NAMES)
    report = json.loads((out / "report.json").read_text())
    for name in GRAPH_NAMES:
        path = out / "onnx" / f"{name}.onnx"
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert model.opset_import[0].version >= 18
        floats = {onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type) for i in model.graph.input
                  if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
        if name != "unet":  # the unet's timestep is fp32 by contract
            assert floats == {"FLOAT16" if precision == "fp16" else "FLOAT"}, (name, floats)
        r = report["onnx"][name]
        assert r["passed"], (name, r)
        points = {json.dumps(c["point"], sort_keys=True) for c in r["comparisons"]}
        assert len(points) >= 2, f"{name} checked at one shape only"
        for c in r["comparisons"]:
            assert c["cosine"] > 0.999 and c["max_abs_err"] <= c["bound"]
            assert c["stats"]["comparator"] == "polygraphy onnxruntime vs pytorch-fp32"  # checked through Polygraphy
            assert c["stats"]["verdict"] == "PASSED" and c["stats"]["atol"] == c["bound"], c


def test_dynamic_dims_survive_in_the_onnx_inputs(exported):
    _, out, _ = exported
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(out / "onnx" / "unet.onnx")).graph.input}
    assert dims["sample"] == ["3*B", 8, "8*h8", "8*w8"] and dims["bim_residual"][0] == "B"
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(out / "onnx" / "llava.onnx")).graph.input}
    assert dims["prefix_ids"] == ["B", "Lp"] and dims["suffix_ids"] == ["B", "Ls"]


def test_graphs_at_the_profile_corners(exported, tiny_pipe):
    """Beyond the two checked shapes: min and max of the profile, against fp32 PyTorch."""
    precision, out, _ = exported
    g = graph_table(tiny_pipe.config, SMALL)
    for name in ("llava", "qformer_bim", "vae_decoder"):
        spec, ref = g[name].spec, g[name].module(tiny_pipe.stages)
        path = out / "onnx" / f"{name}.onnx"
        comps = compare(lambda x: run_file(path, x), spec, ref, precision, ref if precision == "fp32" else None,
                        [spec.point("min"), spec.point("max")])
        for c in comps:
            limit = c.bound if precision == "fp32" else 2e-2 * max(1.0, c.ref_max_abs)
            assert c.max_abs_err <= limit and c.cosine > 0.999, c


def test_manifest_records_versions_source_specs_and_hashes(exported):
    precision, out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["manifest_version"] == 4
    assert manifest["toolchain"]["torch"] and manifest["toolchain"]["onnx"] and manifest["toolchain"]["smartedit"]
    assert manifest["source"]["kind"] == "random" and len(manifest["source"]["sha256"]) == 64
    for name, entry in manifest["artifacts"]["onnx"].items():
        assert (entry["target"], entry["graph"]) == ("onnx", name) and entry["verified"] is True
        assert entry["options"]["precision"] == precision and entry["requires"] == {}
        assert entry["spec"]["profile"] and entry["spec"]["dims"]
        for rel, f in entry["files"].items():
            assert sha256_file(out / rel) == f["sha256"] and (out / rel).stat().st_size == f["bytes"]
    unet = manifest["artifacts"]["onnx"]["unet"]
    assert unet["spec"]["profile"]["sample"] == [[3, 8, 32, 32], [3, 8, 32, 32], [9, 8, 64, 64]]


def test_edit_through_onnxruntime_matches_eager(exported, test_image):
    from smartedit.pipeline import SmartEditPipeline
    from smartedit.weights import ModelSource

    precision, out, _ = exported
    eager = SmartEditPipeline.from_preset("tiny", seed=0)
    ort = SmartEditPipeline.on_backend("onnxruntime", ModelSource(preset="tiny"), artifacts=out)
    assert ort.stages.unet.unet.conv_in.weight.is_meta  # no stage weights needed in PyTorch
    a = np.asarray(eager(test_image, "make it blue", steps=8, seed=3), dtype=np.float64)
    b = np.asarray(ort(test_image, "make it blue", steps=8, seed=3), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / max(((a - b) ** 2).mean(), 1e-12))
    assert psnr >= 35, f"ONNX Runtime ({precision}) edit is {psnr:.1f} dB from the fp32 eager edit"


def test_folded_cfg_unet_matches_the_pipeline_step(tmp_path, tiny_pipe):
    from smartedit.pipeline import SmartEditPipeline
    from smartedit.scheduler import get_sampler

    run_export(tmp_path, ModelSource(preset="tiny"), precision="fp32", graph_names="unet", fold_cfg=True, profile=SMALL,
               progress=_quiet)
    ort = OnnxRuntimeRunner(Artifacts(tmp_path, "onnx"))
    assert ort.fold_cfg
    folded = SmartEditPipeline(tiny_pipe.config, tiny_pipe.tokenizer, tiny_pipe.stages, tiny_pipe.null_text_embeds,
                               runner=ort)
    g = torch.Generator().manual_seed(0)
    lat, img = torch.randn(2, 4, 32, 40, generator=g), torch.randn(2, 4, 32, 40, generator=g)
    prompt, res = torch.randn(2, 77, 32, generator=g), torch.randn(2, 32, 16, 16, generator=g)
    row = get_sampler("euler-ancestral").plan(50).table[7]
    args = (lat, img, row, prompt, res, 7.5, 1.5)
    assert_close(folded.guided_eps(*args), tiny_pipe.guided_eps(*args), atol=1e-4, msg="folded CFG step")
    # a cheaper step of a guidance schedule: the folded combine with the scales that reduce it to 2 or 1 branches
    ddim = get_sampler("ddim").plan(50).table[7]  # sigma 0: the folded graph's input scaling is x / 1
    for branches in (2, 1):
        args = (lat, img, ddim, prompt, res, 7.5, 1.5, branches)
        assert_close(folded.guided_eps(*args), tiny_pipe.guided_eps(*args), atol=1e-4, msg=f"{branches} branches")


def test_rerun_skips_and_changed_inputs_reexport(tmp_path):
    run_export(tmp_path, ModelSource(preset="tiny"), precision="fp32", graph_names="qformer_bim,vae_decoder", profile=SMALL,
               progress=_quiet)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "onnx").iterdir()}
    said = []
    run_export(tmp_path, ModelSource(preset="tiny"), precision="fp32", graph_names="qformer_bim,vae_decoder", profile=SMALL,
               progress=said.append)
    assert said == ["qformer_bim: up to date, skipped", "vae_decoder: up to date, skipped"]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "onnx").iterdir()} == files
    said.clear()  # a different seed is a different model: both re-export
    run_export(tmp_path, ModelSource(preset="tiny", seed=1), precision="fp32", graph_names="qformer_bim", profile=SMALL,
               progress=said.append)
    assert any("qformer_bim: exporting" in m for m in said)
    (tmp_path / "onnx" / "qformer_bim.onnx").write_bytes(b"tampered")  # a damaged file is not up to date
    said.clear()
    run_export(tmp_path, ModelSource(preset="tiny", seed=1), precision="fp32", graph_names="qformer_bim", profile=SMALL,
               progress=said.append)
    assert any("qformer_bim: exporting" in m for m in said)


def test_interrupted_export_leaves_finished_graphs_valid_and_nothing_half_written(tmp_path, monkeypatch):
    import smartedit.export.onnx as onnx_mod

    real = onnx_mod.torch.onnx.export
    calls = []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C during the second graph
        return real(*a, **k)

    monkeypatch.setattr(onnx_mod.torch.onnx, "export", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_export(tmp_path, ModelSource(preset="tiny"), precision="fp32", graph_names="qformer_bim,vae_decoder", profile=SMALL,
                   progress=_quiet)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert list(manifest["artifacts"]["onnx"]) == ["qformer_bim"]
    assert sorted(os.listdir(tmp_path / "onnx")) == ["qformer_bim.onnx"]  # no temp folders, no vae_decoder file
    monkeypatch.setattr(onnx_mod.torch.onnx, "export", real)
    said = []
    run_export(tmp_path, ModelSource(preset="tiny"), precision="fp32", graph_names="qformer_bim,vae_decoder", profile=SMALL,
               progress=said.append)
    assert said[0] == "qformer_bim: up to date, skipped" and any("vae_decoder: exporting" in m for m in said)


def test_lora_merge_equals_unmerged():
    from smartedit.config import PRESETS
    from smartedit.mllm import SmartEditLLM

    torch.manual_seed(0)
    llm = SmartEditLLM(PRESETS["tiny"].llm).eval()
    for name, p in llm.named_parameters():
        if "lora_B" in name:
            p.data.normal_(std=0.5)  # a clearly non-zero adapter
    x = torch.randn(2, 40, 64)
    with torch.no_grad():
        before = llm(x)
        bare = llm.model.layers[0].self_attn.q_proj.get_base_layer().weight.clone()
    assert merge_lora(llm.model) == 4
    assert not any("lora" in k for k in llm.state_dict())
    with torch.no_grad():
        assert not torch.equal(llm.model.layers[0].self_attn.q_proj.weight, bare)
        assert_close(llm(x), before, atol=2e-5, rtol=1e-5, msg="merged vs unmerged LoRA")


def test_specialised_dynamic_dim_is_refused(tmp_path):
    class Chunky(torch.nn.Module):  # chunk(3) on a 3*B axis: torch.export pins B, torch.onnx falls back silently
        def forward(self, x):
            a, b, c = torch.cat([x, x, x]).chunk(3)
            return a + b * c

    spec = GraphSpec("chunky", (TensorSpec("x", "float", ("B", 4)),), (TensorSpec("y", "float", ("B", 4)),),
                     {"B": DimRange(1, 2, 4)})
    with pytest.raises(ExportError, match=r"chunky.x: dimension 'B' was exported as the constant"):
        export_onnx(Chunky(), spec, tmp_path / "chunky.onnx", "fp32")
    assert not list(tmp_path.iterdir())


def test_bad_requests_name_the_value(tmp_path, tiny_pipe):
    with pytest.raises(ValueError, match=r"unknown graph name\(s\) \['unet2'\]"):
        parse_graph_names("unet2,vae_decoder")
    with pytest.raises(ValueError, match=r"min-res must be a multiple of 64 .*, got 200"):
        ProfileOptions(min_res=200)
    with pytest.raises(ValueError, match=r"--opt-res 512 is above --max-res 256: the profile needs min <= opt <= max, got 512/512/256"):
        ProfileOptions(min_res=512, opt_res=512, max_res=256)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InputError, match="cannot write to output folder"):
        run_export(blocker / "out", ModelSource(preset="tiny"), progress=_quiet)
    with pytest.raises(InputError, match=r"unknown export target 'tflite'; choose one of \['onnx', 'trt', "):
        run_export(tmp_path / "o", ModelSource(preset="tiny"), target="tflite", progress=_quiet)


def test_onnxruntime_backend_refuses_shapes_outside_the_profile(exported):
    _, out, _ = exported
    be = OnnxRuntimeRunner(Artifacts(out, "onnx"))
    x = torch.randn(1, 4, 72, 64)  # latent 72 = 576 px > max-res 512
    with pytest.raises(InputError, match=r"vae_decoder: image height 576 px is outside the exported range 256-512 px "
                                         r"\(re-export with --min-res / --max-res\)"):
        be.run("vae_decoder", {"latents": x})
    assert be.run("vae_decoder", {"latents": torch.randn(1, 4, 40, 48)})["image"].shape == (1, 3, 320, 384)


def test_verification_points_differ_from_opt_in_every_dim(tiny_pipe):
    for name, g in graph_table(tiny_pipe.config, SMALL).items():
        opt, alt = verification_points(g.spec)
        assert all(opt[k] != alt[k] for k in opt), (name, opt, alt)
        assert g.spec.contains(alt)


def test_cli_export_then_edit_on_onnxruntime(tmp_path, test_image, capsys):
    from smartedit.cli import edit_cli
    from smartedit.export.cli import main as export_main

    test_image.save(tmp_path / "in.png")
    code, _, err = run_cli(export_main, ["--preset", "tiny", "--random-weights", "--out", tmp_path / "art",
                                         "--graphs", "qformer_bim,nope"], capsys)
    assert code == 2 and "unknown graph name(s) ['nope']" in err
    (tmp_path / "plain").mkdir()  # a folder, but no export (the output goes outside it: no overwrite refusal)
    code, _, err = run_cli(edit_cli, ["--preset", "tiny", "--random-weights", "--seed", "5", "--backend",
                                      "onnxruntime", "--artifacts", tmp_path / "plain", "--image", tmp_path / "in.png",
                                      "--instruction", "x", "--out", tmp_path / "o.png"], capsys)
    assert code == 2 and "not an smartedit-export output folder" in err and len(err.strip().splitlines()) == 1


def test_a_perturbed_onnx_graph_fails_polygraphy_naming_the_output(onnx_export, tiny_pipe, tmp_path, capsys):
    """One weight of the vae_decoder changed in a copy (with the onnx package, the hash re-recorded so the file is
    run): smartedit-verify's Polygraphy comparison fails it, naming the output; PyTorch's saved outputs and inputs
    load with Polygraphy's own loaders and hold what the fp32 module gives on those inputs."""
    import shutil

    from onnx import numpy_helper
    from polygraphy.comparator import RunResults
    from polygraphy.json import load_json

    from smartedit.export.onnx_parity import PYTORCH, compare_onnx
    from smartedit.export.verify import main as verify

    out = tmp_path / "perturbed"
    shutil.copytree(onnx_export("fp32"), out)
    path = out / "onnx" / "vae_decoder.onnx"
    model = onnx.load(str(path))
    w = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the largest weight
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) + np.float32(0.5), w.name))
    onnx.save(model, str(path))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["artifacts"]["onnx"] = {"vae_decoder": manifest["artifacts"]["onnx"]["vae_decoder"]}
    manifest["artifacts"]["onnx"]["vae_decoder"]["files"]["onnx/vae_decoder.onnx"] = {
        "sha256": sha256_file(path), "bytes": path.stat().st_size}
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, stdout, err = run_cli(verify, [out, "--preset", "tiny", "--random-weights"], capsys)
    assert code == 1 and "onnx/vae_decoder onnxruntime vs PyTorch at 2 shapes: FAIL (worst image:" in stdout, stdout
    assert "      image: FAILED | max absdiff" in stdout and "polygraphy onnxruntime vs pytorch-fp32" in stdout
    assert "FAILED:" in err and "onnx/vae_decoder" in err and len(err.strip().splitlines()) == 1
    result = json.loads((out / "verify.json").read_text())["parity"]["onnx"]["vae_decoder"]
    assert not result["passed"] and {c["stats"]["verdict"] for c in result["comparisons"]} == {"FAILED"}

    g = graph_table(tiny_pipe.config, SMALL)["vae_decoder"]
    ref = g.module(tiny_pipe.stages).eval()
    points = verification_points(g.spec)
    saved = tmp_path / "saved"
    saved.mkdir()
    comps = compare_onnx(path, g.spec, ref, "fp32", None, points, folder=saved)
    assert [c.output for c in comps if not c.passed] == ["image", "image"]
    results = RunResults.load(str(saved / "vae_decoder.pytorch.json"))
    feeds = load_json(str(saved / "vae_decoder.inputs.json"))
    assert list(results.keys()) == [PYTORCH] and len(results[PYTORCH]) == len(feeds) == len(points)
    for point, feed, it in zip(points, feeds, results[PYTORCH]):
        x = g.spec.sample_inputs(point, "fp32", seed=1)
        assert list(feed) == list(x) and all(np.array_equal(feed[k], x[k].numpy()) for k in x)
        with torch.no_grad():
            assert_close(torch.from_numpy(np.asarray(it["image"])), ref(*x.values()), atol=0, msg=str(point))
