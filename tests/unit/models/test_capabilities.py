"""Capabilities declared by the adapters, and the one check of what an entry needs."""

from __future__ import annotations

import pytest

from mmscope.core.errors import NotApplicableError, RegistryError
from mmscope.core.registry import REGISTRY
from mmscope.models.capabilities import applicability, missing, require


def test_the_three_first_families_declare_what_they_can_do(tiny_llava, tiny_clip, tiny_qwen2_vl):
    llava, clip, qwen = (m.capabilities for m in (tiny_llava, tiny_clip, tiny_qwen2_vl))
    assert llava.generates and not llava.contrastive and llava.images_in == "sequence"
    assert set(llava.attention) == {"lm.layer", "vision.layer"} and llava.class_token
    assert clip.contrastive and not clip.generates and clip.images_in == "none"
    assert set(clip.attention) == {"vision.layer", "text.layer"} and clip.class_token
    # Qwen2-VL's vision attention returns no probabilities, and its tower has no class token
    assert qwen.attention == ("lm.layer",) and not qwen.class_token


def test_require_names_the_method_the_model_and_each_missing_need(tiny_clip, tiny_qwen2_vl):
    with pytest.raises(NotApplicableError) as err:
        require(tiny_clip, ("generates", "lm_attention"), "analysis fastv")
    message = str(err.value)
    assert message.startswith("analysis fastv needs a model that generates text and exposes")
    assert "tiny-clip (clip, a contrastive encoder) does not" in message
    assert missing(tiny_qwen2_vl, ("vision_attention", "lm_attention")) == [
        "exposes its vision tower's attention probabilities"
    ]
    require(tiny_qwen2_vl, ("generates", "lm_attention"), "analysis fastv")  # applies: no raise
    with pytest.raises(RegistryError, match="unknown need 'flies'"):
        missing(tiny_clip, ("flies",))


def test_every_declared_need_is_known_and_decoders_need_generation(tiny_llava, tiny_clip):
    import mmscope.decoding  # noqa: F401
    import mmscope.methods  # noqa: F401
    import mmscope.metrics  # noqa: F401

    entries = [e for e in REGISTRY.entries() if e.kind != "adapter"]
    refused = {e.key for e, why in applicability(tiny_llava, entries) if why}
    assert refused == {"splice", "textspan", "clip_dissect"}  # they read a CLIP-style embedding
    refused = {e.key for e, why in applicability(tiny_clip, entries) if why}
    assert {"greedy", "vcd", "opera", "fastv", "first_token", "pope", "chair"} <= refused
    assert "integrated_gradients" not in refused


def test_an_entry_that_does_not_apply_is_refused_before_any_work(tiny_clip, monkeypatch):
    from mmscope.methods.analysis import make_analysis

    fastv = make_analysis("fastv")
    with pytest.raises(NotApplicableError, match="analysis fastv needs a model that generates"):
        fastv(tiny_clip, None)  # no inputs at all: the check comes first


def test_methods_cli_says_what_does_not_apply(capsys):
    from mmscope.cli import main

    assert main(["methods", "--model", "toy-clip"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("toy-clip (clip): generates=False, contrastive=True")
    fastv = out.split("    fastv ")[1].split("\n")[1]
    assert fastv.strip().startswith("does not apply: analysis fastv needs a model that generates")
    lens = out.split("    logit_lens ")[1].split("\n")[1]
    assert "does not apply" not in lens
