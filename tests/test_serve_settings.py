"""The `smartedit` model's settings (serve/settings.py): one dataclass, built by the command line, carried by the
model config, read back by the model with the same bounds."""

from __future__ import annotations

import json
import sys
import types

import pytest

from conftest import run_cli
from smartedit.errors import InputError
from smartedit.scheduler import MAX_STEPS
from smartedit.serve.settings import ServeSettings
from smartedit.weights import ModelSource

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed (pip install -e '.[test]')")


def _settings(**over) -> ServeSettings:
    from smartedit.serve.server import settings_for

    return settings_for(ModelSource(preset="tiny", seed=3), "eager", None, "cpu", "fp32", **over)


def _config(settings: ServeSettings):
    """The `smartedit` model's config.pbtxt text, parsed back as Triton would read it."""
    from smartedit.serve.repository import model_config_pb, orchestrator_config

    mc, text_format = model_config_pb()
    text = text_format.MessageToString(orchestrator_config(settings, settings.max_batch, 5.0, 1, gpu=False))
    return text_format.Parse(text, mc.ModelConfig())


@pytest.mark.parametrize("over", [dict(), dict(max_steps=MAX_STEPS, max_batch=2, max_variants=2, max_evaluations=90,
                                             max_megapixels=0.5, warm_up="max")], ids=["defaults", "every-field"])
def test_the_settings_round_trip_through_the_model_config(over):
    s = _settings(**over)
    back = ServeSettings.from_json(_config(s).parameters["settings"].string_value)
    assert back == s and isinstance(back.source, ModelSource) and back.source.seed == 3
    assert json.loads(back.to_json())["source"] == {"preset": "tiny", "seed": 3}  # the JSON the model reads


def test_a_relative_model_folder_is_taken_from_the_version_folder(tmp_path):
    s = ServeSettings(ModelSource(model="model"), "bls", None, graphs={}, files={})
    back = ServeSettings.from_json(s.to_json())
    assert back == s and back.model_source(tmp_path / "1").model == tmp_path / "1" / "model"


BAD = [  # (field, value, what the message says)
    ("max_steps", 5000, f"max_steps = 5000: --max-steps must be an integer from 1 to the sampler's {MAX_STEPS}, "
                        "got 5000"),
    ("max_steps", 0, "max_steps = 0"),
    ("max_steps", "100", "max_steps = '100'"),
    ("max_batch", True, "max_batch = True"),
    ("max_megapixels", float("inf"), "--max-megapixels must be a finite number > 0, got inf"),
    ("max_variants", 9, "--max-variants 9 is over --max-batch 4"),
    ("max_evaluations", -1, "max_evaluations = -1"),
    ("warm_up", "often", "--warm-up must be one of ['min', 'max'], got 'often'"),
    ("dtype", "fp64", "'fp64'"),
    ("source", {"preset": "huge", "seed": 0}, "unknown preset 'huge'"),
    ("source", {"model": "m", "preset": "tiny"}, "source must be"),
    ("colour", "blue", "unknown fields ['colour']"),
]


@pytest.mark.parametrize("field,value,says", BAD, ids=[f"{r[0]}-{r[1]}" for r in BAD])
def test_a_config_out_of_bounds_is_refused_naming_the_value(field, value, says):
    d = json.loads(_settings().to_json())
    d[field] = value
    with pytest.raises(InputError) as err:
        ServeSettings.from_json(json.dumps(d), "smartedit/config.pbtxt")
    assert str(err.value).startswith("the settings of smartedit/config.pbtxt: ") and says in str(err.value), \
        str(err.value)


def test_the_model_refuses_to_load_a_config_past_the_samplers_bound(tmp_path, monkeypatch):
    """The Triton model reads its config's settings back into ServeSettings: one that carries max_steps 5000 (which
    smartedit-serve refuses) is refused at load with one line naming it, before any weights load."""
    from smartedit.serve import model

    config = _config(_settings())
    d = json.loads(config.parameters["settings"].string_value)
    d["max_steps"] = 5000
    config.parameters["settings"].string_value = json.dumps(d)
    from google.protobuf import json_format

    fake = types.SimpleNamespace(using_decoupled_model_transaction_policy=lambda c: False)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    monkeypatch.setattr(model, "build_service", lambda *a, **k: pytest.fail("the model was built"))
    args = {"model_config": json_format.MessageToJson(config, preserving_proto_field_name=True),
            "model_repository": str(tmp_path / "smartedit"), "model_version": "1", "model_name": "smartedit"}
    with pytest.raises(RuntimeError) as err:
        model.TritonPythonModel().initialize(args)
    assert str(err.value) == ("smartedit: InputError: the settings of smartedit/config.pbtxt: max_steps = 5000: "
                              f"--max-steps must be an integer from 1 to the sampler's {MAX_STEPS}, got 5000")


@pytest.mark.parametrize("flags,says", [
    (["--max-steps", "5000"], f"--max-steps must be an integer from 1 to the sampler's {MAX_STEPS}, got 5000"),
    (["--max-megapixels", "nan"], "--max-megapixels must be a finite number > 0, got nan"),
    (["--max-variants", "8", "--max-batch", "4"], "--max-variants 8 is over --max-batch 4"),
], ids=["max-steps-5000", "megapixels-nan", "variants-over-batch"])
def test_the_command_line_refuses_what_the_model_would(flags, says, capsys, monkeypatch):
    from smartedit.serve import cli

    monkeypatch.setattr(cli, "serve", lambda *a, **k: pytest.fail("the server was started"))
    code, out, err = run_cli(cli.main, ["--preset", "tiny", "--random-weights", *flags], capsys)
    assert code == 2 and f"smartedit-serve: error: {says}" in err, err
