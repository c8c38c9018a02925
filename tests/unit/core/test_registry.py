import pytest

from mmscope.core.errors import RegistryError
from mmscope.core.registry import Registry


def test_register_and_get_keeps_metadata():
    reg = Registry()

    @reg.register(
        "saliency", family="attribution/gradient", paper="Simonyan 2014", level="data/input-output"
    )
    class Saliency:
        pass

    entry = reg.get("saliency")
    assert entry.obj is Saliency
    assert (entry.family, entry.paper, entry.level) == (
        "attribution/gradient",
        "Simonyan 2014",
        "data/input-output",
    )
    assert reg.keys() == ["saliency"]


def test_duplicate_key_raises_but_other_kind_is_separate():
    reg = Registry()
    reg.register("x")(object)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("x")(object)
    reg.register("x", kind="metric")(object)  # same key, another kind: fine
    assert reg.keys("metric") == ["x"]


def test_unknown_key_lists_known_ones():
    reg = Registry()
    reg.register("a")(object)
    reg.register("b")(object)
    with pytest.raises(RegistryError, match="known: a, b"):
        reg.get("c")


def test_adapters_are_registered_by_hf_class():
    from mmscope.models import supported_classes

    classes = supported_classes()
    assert {"LlavaForConditionalGeneration", "CLIPModel", "Qwen2VLForConditionalGeneration"} <= set(
        classes
    )


def test_level_must_be_one_of_the_survey_levels():
    reg = Registry()
    with pytest.raises(RegistryError, match="not one of"):
        reg.register("x", level="model/nonsense")


def test_tree_puts_entries_under_their_level():
    from mmscope.core.taxonomy import tree

    lines = tree([("model/layer", "causal_tracing", "layer/patching", "Meng et al. 2022")])
    i = lines.index("  layer")
    assert lines[i + 1].split()[0] == "causal_tracing"
    assert "  token  (nothing yet)" in lines
