"""Official release layout -> smartedit-convert -> from_pretrained gives the source model back exactly (fp32)."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import assert_close
from safetensors.torch import save_file

from smartedit.checkpoint import (
    CheckpointError,
    convert_official,
    find_step,
    load_torch_file,
)
from smartedit.pipeline import SmartEditPipeline
from smartedit.testing import write_official_release

STEP = 1234  # not 15000: the step is found, not assumed


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    src = SmartEditPipeline.from_preset("tiny", seed=7)
    root = tmp_path_factory.mktemp("release")
    dirs = write_official_release(src, root, step=STEP)
    save_file({"null": src.null_text_embeds.contiguous()}, str(root / "null.safetensors"))
    return src, dirs, root


def _convert(dirs, out, **kw):
    kw.setdefault("clip_dir", dirs["clip"])
    return convert_official(dirs["official"], out, "tiny", dirs["llava"], ip2p_dir=dirs["ip2p"], **kw)


def test_round_trip_is_exact(release, tmp_path, test_image):
    src, dirs, root = release
    assert not (dirs["official"] / "adapter_config.json").exists()  # the public release lacks it: not an error
    out = _convert(dirs, tmp_path / "model", null_text=root / "null.safetensors")
    pipe = SmartEditPipeline.from_pretrained(out)
    for name, module in pipe.stages.items():
        ref = getattr(src.stages, name).state_dict()
        got = module.state_dict()
        assert set(got) == set(ref), name
        for k in ref:
            assert torch.equal(got[k], ref[k]), f"{name}: {k}"
    cond = pipe.encode_condition([test_image], ["make it blue"])
    ref_cond = src.encode_condition([test_image], ["make it blue"])
    for a, b in zip(cond, ref_cond):
        assert_close(a, b, atol=0, msg="conditioning after round trip")
    a = pipe(test_image, "make it blue", steps=2, seed=0)
    b = src(test_image, "make it blue", steps=2, seed=0)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    half = SmartEditPipeline.from_pretrained(out, dtype=torch.float16)  # cast while streaming in
    w16, w32 = half.stages.unet.unet.conv_in.weight, pipe.stages.unet.unet.conv_in.weight
    assert w16.dtype == torch.float16 and torch.equal(w16, w32.half())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source"]["step"] == STEP and cfg["random_weights"] is False and cfg["format"] == "smartedit"


def test_null_text_comes_from_ip2p_text_encoder(release, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    _, dirs, _ = release
    out = _convert(dirs, tmp_path / "model")
    null = load_torch_file(out / "null_text.safetensors")["null_text_embeds"]
    tok = CLIPTokenizer.from_pretrained(dirs["ip2p"] / "tokenizer")
    enc = CLIPTextModel.from_pretrained(dirs["ip2p"] / "text_encoder")
    ids = tok([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        assert_close(null, enc(ids).last_hidden_state, atol=0, msg="null text")
    assert null.shape == (1, 77, 32)


def test_vision_tower_from_llava_folder_when_no_clip_folder(release, tmp_path):
    _, dirs, root = release
    llava = tmp_path / "llava"
    shutil.copytree(dirs["llava"], llava)
    shutil.copy(dirs["clip"] / "model.safetensors", llava / "model.safetensors")
    (llava / "model.safetensors").rename(llava / "vision.bin.safetensors")
    # safetensors are preferred over .bin in one folder: keep the LLaVA .bin shards as safetensors too
    for f in sorted(llava.glob("*.bin")):
        save_file({k: v.contiguous() for k, v in torch.load(f, weights_only=True).items()},
                  str(f.with_suffix(".safetensors")))
    out = convert_official(dirs["official"], tmp_path / "m", "tiny", llava, ip2p_dir=dirs["ip2p"],
                           null_text=root / "null.safetensors")
    assert (out / "vision.safetensors").is_file()


def test_step_discovery(release, tmp_path):
    _, dirs, _ = release
    assert find_step(dirs["official"]) == STEP
    two = tmp_path / "two"
    shutil.copytree(dirs["official"], two)
    for name in ("LLM", "modulate", "unet"):
        shutil.copytree(two / f"{name}-{STEP}", two / f"{name}-99")
    shutil.copy(two / "embeddings_qformer" / f"checkpoint-{STEP}_embeddings_qformer.bin",
                two / "embeddings_qformer" / "checkpoint-99_embeddings_qformer.bin")
    with pytest.raises(CheckpointError, match=r"several complete steps.*\[99, 1234\].*--step"):
        find_step(two)
    assert find_step(two, 99) == 99
    with pytest.raises(CheckpointError, match="no training step common"):
        find_step(dirs["llava"])


def test_missing_file_is_named(release, tmp_path):
    _, dirs, _ = release
    broken = tmp_path / "official"
    shutil.copytree(dirs["official"], broken)
    (broken / f"unet-{STEP}" / "adapter_model.bin").unlink()
    with pytest.raises(CheckpointError, match=rf"unet-{STEP}/adapter_model.bin"):
        convert_official(broken, tmp_path / "out", "tiny", dirs["llava"], ip2p_dir=dirs["ip2p"])
    assert not (tmp_path / "out").exists()


def _rewrite(path, edit):
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def test_unexpected_missing_and_misshaped_keys_are_listed(release, tmp_path):
    _, dirs, _ = release
    broken = tmp_path / "official"
    shutil.copytree(dirs["official"], broken)
    bim = broken / f"modulate-{STEP}" / "adapter_model.bin"
    _rewrite(bim, lambda sd: (sd.pop("modulate_head.bias"), sd.__setitem__("extra.weight", torch.zeros(1)),
                              sd.__setitem__("modulate_head.weight", torch.zeros(64, 31))))
    with pytest.raises(CheckpointError) as e:
        _convert(dict(dirs, official=broken), tmp_path / "out")
    msg = str(e.value)
    assert "1 missing keys: modulate_head.bias" in msg
    assert "1 unexpected keys: extra.weight" in msg
    assert "modulate_head.weight (64, 32) vs (64, 31)" in msg
    assert not (tmp_path / "out").exists()


def test_wrong_preset_is_a_shape_error(release, tmp_path):
    _, dirs, _ = release
    with pytest.raises(CheckpointError, match="shape mismatches"):
        convert_official(dirs["official"], tmp_path / "out", "7b", dirs["llava"], ip2p_dir=dirs["ip2p"],
                         clip_dir=dirs["clip"])


class Evil:
    def __reduce__(self):
        return (print, ("this would run at load time",))


def test_pickle_that_needs_code_is_refused(tmp_path):
    torch.save({"w": torch.zeros(1), "x": Evil()}, tmp_path / "evil.bin")
    with pytest.raises(CheckpointError, match="refused to load .*evil.bin"):
        load_torch_file(tmp_path / "evil.bin")


def test_existing_output_is_not_overwritten(release, tmp_path):
    _, dirs, root = release
    out = tmp_path / "model"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="not empty"):
        _convert(dirs, out, null_text=root / "null.safetensors")
    assert (out / "keep.txt").read_text() == "mine"


def test_incomplete_model_folder_is_refused(release, tmp_path):
    _, dirs, root = release
    out = _convert(dirs, tmp_path / "model", null_text=root / "null.safetensors")
    (out / "bim.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing: .*bim.safetensors"):
        SmartEditPipeline.from_pretrained(out)
    with pytest.raises(CheckpointError, match="not a SmartEdit model folder"):
        SmartEditPipeline.from_pretrained(tmp_path)
