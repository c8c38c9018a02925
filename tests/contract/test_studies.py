"""Contract over every registered study, on every architecture: it leaves the model exactly as
it found it (also when a forward raises midway), or says it does not apply; its result is a
frozen ``Result`` that serialises to strict JSON, draws a figure and writes its tables."""

import dataclasses
import inspect
import json

import pytest
import torch
from matplotlib.figure import Figure

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.methods.analysis import Result, jsonable
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.study import KIND, studies, study, write_table
from mmscope.world.items import world_items

#: Cheaper settings for costly studies (applied where the study has the setting); their
#: defaults are exercised in their unit tests.
FAST: dict[str, dict] = {
    "neuron_stats": {"progress": False},
    "dape": {"progress": False, "top_share": 0.05},
    "miner": {"progress": False},
    "knowledge_neurons": {"steps": 2},
    "neuron_edit": {"random_sets": 1, "max_new_tokens": 2},
    "sae_train": {"steps": 5, "epochs": 1, "progress": False},
    "tcav": {"runs": 2},
}
#: Studies that need more than the default 3 items (TCAV: concept and counterexample sets).
ITEMS: dict[str, int] = {"tcav": 8}
STUDIES = studies()


def _items(key, vlm):
    """World items that keep their scenes (the concept studies need them)."""
    return world_items(ITEMS.get(key, 3), contrastive=vlm.contrastive)


def _sites(vlm):
    stack = "vision.layer" if vlm.contrastive else "lm.layer"
    return f"{stack}[0].mlp.act"


def _data(key, vlm, items):
    """Call keywords a study takes beyond ``items``: a domain per item, a neuron set, a
    trained sparse autoencoder (from ``sae_train``, the CLI's ``--sae`` in memory)."""
    takes = inspect.signature(REGISTRY.get(key, KIND).obj.__call__).parameters
    out = {}
    if "domains" in takes:
        out["domains"] = ["plain", "dark", "plain"][: len(items)]
    if "neurons" in takes:
        out["neurons"] = NeuronSet(
            "test", ((_sites(vlm), 0), (_sites(vlm), 1)), ("a", "a"), (1.0, 0.5)
        )
    if "sae" in takes:
        trained = _run("sae_train", vlm, items)
        out["sae"] = getattr(trained, "sae", trained)
    return out


def _settings(key):
    params = inspect.signature(REGISTRY.get(key, KIND).obj).parameters
    return {k: v for k, v in FAST.get(key, {}).items() if k in params}


def _run(key, vlm, items):
    return study(key, vlm, items, **_settings(key), **_data(key, vlm, items))


def test_the_registry_has_the_neuron_studies():
    assert {"neuron_stats", "dape", "miner"} <= set(STUDIES)


@pytest.mark.parametrize("key", STUDIES)
def test_state_result_and_serialisation(key, any_vlm, tmp_path):
    items = _items(key, any_vlm)
    before = model_state(any_vlm.model)
    try:
        result = _run(key, any_vlm, items)
    except NotApplicableError as err:
        assert model_state(any_vlm.model) == before
        assert str(err)
        return
    assert model_state(any_vlm.model) == before
    assert isinstance(result, Result) and dataclasses.is_dataclass(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, dataclasses.fields(result)[0].name, None)
    json.dumps(jsonable(result.to_dict()), allow_nan=False)  # strict JSON: NaN as null
    assert isinstance(result.plot(), Figure)  # one result protocol: plot gives a Figure
    for name, columns in getattr(result, "tables", dict)().items():
        assert write_table(columns, tmp_path / f"{name}.parquet").exists()


@pytest.mark.parametrize("key", STUDIES)
@pytest.mark.parametrize(
    "vlm,site", [("tiny_llava", "lm.layer[1]"), ("tiny_clip", "vision.layer[0]")]
)
def test_state_unchanged_when_a_forward_raises_midway(key, vlm, site, request):
    vlm = request.getfixturevalue(vlm)
    items = _items(key, vlm)
    data = _data(key, vlm, items)  # built before the model is broken

    def explode(hidden):  # in the middle of the model, with the study's hooks in place
        raise RuntimeError("boom")

    vlm.model.train()  # a non-default state, to see it restored
    try:
        with patch(vlm, {site: explode}):
            before = model_state(vlm.model)
            with pytest.raises((RuntimeError, NotApplicableError)):
                study(key, vlm, items, **_settings(key), **data)
            assert model_state(vlm.model) == before
            assert torch.is_grad_enabled()
    finally:
        vlm.model.eval()


def test_settings_are_checked_by_name():
    for key in STUDIES:
        with pytest.raises(InputError, match="takes the settings"):
            REGISTRY.make(key, KIND, no_such_setting=1)
