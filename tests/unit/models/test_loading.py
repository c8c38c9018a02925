"""mmscope.load: local folders, safety checks and clear errors."""

import json

import pytest
import torch

import mmscope
from mmscope.core.errors import (
    OfflineError,
    UnknownModelError,
    UnsupportedArchitectureError,
    WeightsError,
)


@pytest.fixture(scope="module")
def saved_llava(tmp_path_factory, tiny_llava):
    folder = tmp_path_factory.mktemp("llava")
    tiny_llava.model.save_pretrained(folder)
    tiny_llava.processor.save_pretrained(folder)
    return folder


def test_local_folder_round_trip(saved_llava, tiny_llava, scene_image):
    vlm = mmscope.load(str(saved_llava))
    assert type(vlm).__name__ == "LlavaVLM" and not vlm.model.training
    prompt = "what color is the circle ?"
    with torch.no_grad():
        a = vlm.forward(vlm.prepare(scene_image, prompt)).logits
        b = tiny_llava.forward(tiny_llava.prepare(scene_image, prompt)).logits
    assert torch.allclose(a, b, atol=1e-6)


def test_eager_attention_on_request(saved_llava):
    vlm = mmscope.load(str(saved_llava), attn_implementation="eager")
    assert vlm.model.config._attn_implementation == "eager"


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(UnknownModelError, match="toy-llava, toy-clip"):
        mmscope.load("toy-nonsense")


def test_hub_id_without_network_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises((OfflineError, UnknownModelError), match="network|hub"):
        mmscope.load("some-owner/some-model-that-is-not-cached")


def test_pickle_only_weights_are_refused(tmp_path, saved_llava):
    (tmp_path / "config.json").write_text((saved_llava / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="safetensors only"):
        mmscope.load(str(tmp_path))


def test_corrupt_weights(tmp_path, saved_llava):
    for f in saved_llava.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="cannot load"):
        mmscope.load(str(tmp_path))


def test_missing_config(tmp_path):
    with pytest.raises(WeightsError, match="config"):
        mmscope.load(str(tmp_path))


def test_unsupported_architecture_names_its_class(tmp_path):
    config = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 10}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedArchitectureError, match="BertForMaskedLM.*LlavaForConditionalGeneration"
    ):
        mmscope.load(str(tmp_path))
