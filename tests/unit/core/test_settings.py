"""Declared types and ranges of settings, checked once by the registry before any work."""

import inspect
import re
from collections.abc import Sequence

import numpy as np
import pytest

import mmscope.decoding  # noqa: F401  (registers the decoders)
import mmscope.methods  # noqa: F401  (registers the methods)
import mmscope.metrics  # noqa: F401  (registers the metrics)
from mmscope.core.errors import InputError
from mmscope.core.registry import REGISTRY, Registry
from mmscope.core.settings import INT_CEILING, Range, check_settings, conforms, describe


class Made:
    """A registered class that counts how often it is made."""

    made = 0
    SETTING_RANGES = {"share": Range(0.1, 0.5)}

    def __init__(
        self,
        steps: int = 4,
        scale: float = 1.0,
        on: bool = True,
        name: str = "a",
        sites: tuple[str, ...] = (),
        pair: tuple[int, int] | None = None,
        window: int | None = None,
        share: float = 0.2,
        seed: int = 0,
    ) -> None:
        Made.made += 1


@pytest.fixture()
def reg():
    registry = Registry()
    registry.register("made")(Made)
    Made.made = 0
    return registry


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"steps": "ten"}, "steps must be an integer, not 'ten'"),
        ({"steps": 2.5}, "steps must be an integer, not 2.5"),
        ({"steps": True}, "steps must be an integer, not True"),
        ({"scale": "big"}, "scale must be a number, not 'big'"),
        ({"on": "maybe"}, "on must be true or false, not 'maybe'"),
        ({"on": 0}, "on must be true or false, not 0"),
        ({"name": 3}, "name must be a string, not 3"),
        ({"sites": "lm.layer[0]"}, "sites must be a list of strings, not 'lm.layer[0]'"),
        ({"sites": ("a", 1)}, "sites must be a list of strings"),
        ({"pair": (1, 2, 3)}, "pair must be 2 values"),
        ({"pair": ("a", "b")}, "pair must be 2 values"),
        ({"window": "3"}, "window must be an integer or None, not '3'"),
    ],
)
def test_wrong_types_are_refused_naming_the_setting_and_value(reg, settings, named):
    with pytest.raises(InputError, match="method made: " + re.escape(named)):
        reg.make("made", **settings)
    assert Made.made == 0  # refused before the class was made


@pytest.mark.parametrize(
    "settings, named",
    [
        ({"steps": 10**9}, "steps must be in [1, 10,000], not 1000000000"),
        ({"steps": 0}, "steps must be in [1, 10,000], not 0"),
        ({"steps": -1}, "steps must be in [1, 10,000], not -1"),
        ({"seed": -1}, "seed must be in [0, 4,294,967,295], not -1"),
        ({"seed": 2**40}, "seed must be in [0, 4,294,967,295]"),
        ({"share": 0.9}, "share must be in [0.1, 0.5], not 0.9"),  # the class's own range
        ({"scale": float("nan")}, "scale must be a finite number, not nan"),
        ({"scale": float("inf")}, "scale must be a finite number"),
        ({"window": INT_CEILING + 1}, "window = 1000001 is over the ceiling of 1,000,000"),
    ],
)
def test_out_of_range_values_are_refused(reg, settings, named):
    with pytest.raises(InputError) as err:
        reg.make("made", **settings)
    assert named in str(err.value) and "\n" not in str(err.value)
    assert Made.made == 0


def test_good_values_pass_and_sequences_of_any_kind_count_as_tuples(reg):
    reg.make("made", steps=np.int64(5), scale=2, on=np.bool_(False), sites=["a", "b"])
    reg.make("made", pair=[1, 2], window=None, share=0.5, seed=2**32 - 1)
    assert Made.made == 2


def test_check_refuses_without_making(reg):
    with pytest.raises(InputError, match="takes the settings"):
        reg.check("made", nope=1)
    assert reg.check("made", steps=3).obj is Made
    assert Made.made == 0


def test_every_registered_class_accepts_its_own_defaults():
    checked = 0
    for entry in REGISTRY.entries():
        if entry.kind == "adapter":
            continue
        params = inspect.signature(entry.obj).parameters.items()
        defaults = {n: p.default for n, p in params if p.default is not inspect.Parameter.empty}
        check_settings(entry.obj, defaults, entry.key)
        checked += 1
    assert checked > 40


@pytest.mark.parametrize(
    "kind, key, settings, named",
    [
        ("method", "integrated_gradients", {"steps": 10**9}, "steps must be in [1, 10,000]"),
        ("method", "rise", {"masks": 10**7}, "masks must be in [1, 100,000]"),
        ("method", "occlusion", {"batch_size": 10**6}, "batch_size must be in [1, 65,536]"),
        ("metric", "pope", {"n_images": 10**9}, "n_images must be in [1, 100,000]"),
        ("decoder", "sampling", {"top_p": 1.5}, "top_p must be in [0, 1], not 1.5"),
        ("decoder", "vcd", {"sample": "yes"}, "sample must be true or false, not 'yes'"),
        ("study", "neuron_stats", {"progress": "maybe"}, "progress must be true or false"),
        ("study", "sae_train", {"epochs": 10**8}, "epochs must be in [1, 1,000,000]"),
        ("analysis", "fastv", {"ratios": (0.5, 2.0)}, "ratios must be in [0, 1], not (0.5, 2.0)"),
        ("analysis", "logit_lens", {"k": -3}, "k must be in [1, 1,000,000], not -3"),
    ],
)
def test_the_real_registry_checks_its_entries(kind, key, settings, named):
    with pytest.raises(InputError) as err:
        REGISTRY.make(key, kind, **settings)
    assert named in str(err.value)


def test_conforms_and_describe():
    assert conforms((1, 2), tuple[int, ...]) and not conforms("ab", Sequence[str])
    assert conforms(None, int | None) and not conforms(1.5, int | None)
    assert conforms({"a": 1}, dict[str, int]) and not conforms([1], dict[str, int])
    assert describe(int | None) == "an integer or None"
    assert describe(tuple[float, ...]) == "a list of numbers"
    assert str(Range(0, None, lo_open=True)) == "> 0" and str(Range(0, 1)) == "in [0, 1]"


def test_a_wrapped_methods_settings_are_checked_too():
    with pytest.raises(InputError, match="method integrated_gradients: steps must be in"):
        REGISTRY.make("smoothgrad", method="integrated_gradients", steps=10**9)
