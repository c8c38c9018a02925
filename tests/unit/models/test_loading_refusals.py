"""mmscope.load refuses every broken model folder with one line: weights that do not fit,
chat templates the sandbox refuses, unknown model types, auto_map code, bad configs; and it
never runs a folder's code or reads its pickles."""

import json
import shutil
import warnings

import pytest
from safetensors.torch import load_file, save_file

import mmscope
from mmscope.core.errors import (
    ChatTemplateError,
    UnsupportedArchitectureError,
    WeightsError,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_llava):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava.model.save_pretrained(folder)
    tiny_llava.processor.save_pretrained(folder)
    return folder


@pytest.fixture()
def copy(tmp_path, saved):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    return folder


def _refused(folder, error, message):
    with pytest.raises(error) as err:
        mmscope.load(str(folder))
    text = str(err.value)
    assert message in text and "\n" not in text, text
    return text


def _tensors(folder):
    return load_file(folder / "model.safetensors")


def _save(folder, tensors):
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_weights_missing_some_tensors_are_refused(copy):
    tensors = _tensors(copy)
    keys = sorted(tensors)
    _save(copy, {k: tensors[k] for k in keys[: len(keys) // 2]})
    text = _refused(copy, WeightsError, "of the model's tensors missing from them")
    assert "random weights" in text


def test_weights_holding_none_of_the_models_tensors_are_refused(copy):
    _save(copy, {"unrelated.weight": next(iter(_tensors(copy).values())).clone()})
    text = _refused(copy, WeightsError, "tensors in them that the model does not have")
    assert "unrelated.weight" in text


def test_an_extra_tensor_is_refused(copy):
    tensors = {k: v.clone() for k, v in _tensors(copy).items()}
    tensors["extra.bias"] = next(iter(tensors.values())).clone()
    _save(copy, tensors)
    _refused(copy, WeightsError, "1 tensors in them that the model does not have (e.g. extra.bias)")


def test_a_tensor_of_the_wrong_shape_is_refused(copy):
    tensors = {k: v.clone() for k, v in _tensors(copy).items()}
    key = next(k for k in tensors if k.endswith("embed_tokens.weight"))
    tensors[key] = tensors[key][:, :-1].clone()
    _save(copy, tensors)
    _refused(copy, WeightsError, "wrong shape")


@pytest.mark.parametrize(
    "template, message",
    [
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "does something the sandbox forbids"),
        ("{{ cycler.__init__.__globals__ }}", "sandbox forbids"),
        ("{% for %}", "does not render"),
        ("{{ raise_exception('no images here') }}", "does not render: no images here"),
    ],
)
def test_a_chat_template_the_sandbox_refuses(copy, template, message):
    (copy / "chat_template.jinja").write_text(template)
    _refused(copy, ChatTemplateError, message)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "zorblax"}, "model type 'zorblax', which is not known to transformers"),
        (
            {"model_type": "zorblax", "auto_map": {"AutoModel": "modeling_x.X"}},
            "model type 'zorblax', which needs the folder's own code (auto_map)",
        ),
        ({"model_type": None}, "names no model_type"),
        ({"architectures": None}, "names no architecture class"),
        ({"architectures": [3]}, "names no architecture class"),
    ],
)
def test_configs_mmscope_cannot_load(copy, change, message):
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **change}))
    error = WeightsError if "model_type" in message else UnsupportedArchitectureError
    text = _refused(copy, error, message)
    if "zorblax" in message:  # what would load is listed
        assert "supported: " in text and "LlavaForConditionalGeneration" in text


@pytest.mark.parametrize(
    "content, message",
    [
        (b"{not json", "is not valid JSON"),
        (b"\xff\xfe\x00", "is not valid JSON"),
        (b"[]", "not a JSON object"),
    ],
)
def test_a_config_that_is_not_a_json_object(copy, content, message):
    (copy / "config.json").write_bytes(content)
    _refused(copy, WeightsError, message)


def test_auto_map_code_never_runs_for_a_known_type(copy):
    config = json.loads((copy / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_x.C", "AutoModel": "modeling_x.M"}
    (copy / "config.json").write_text(json.dumps(config))
    for name in ("configuration_x.py", "modeling_x.py"):
        (copy / name).write_text("raise SystemExit('the folder ran its own code')\n")
    with pytest.warns(UserWarning, match="runs none of it"):
        vlm = mmscope.load(str(copy))
    assert type(vlm.model).__module__.startswith("transformers.")


def test_pickles_next_to_safetensors_are_never_read(copy):
    (copy / "pytorch_model.bin").write_bytes(b"not a pickle: reading it would fail")
    (copy / "model.pt").write_bytes(b"\x80\x04 nor this")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mmscope.load(str(copy)).model is not None


def test_a_corrupt_tokenizer_is_one_line(copy):
    (copy / "tokenizer.json").write_text("{not json")
    _refused(copy, WeightsError, "cannot load the processor")
