"""Sites: built by ``site``/``sites``, split back by ``Site.parse``/``parse_site``, on every role
of every adapter."""

from __future__ import annotations

import pytest

from mmscope.core.errors import SiteError
from mmscope.core.sites import Site, parse_site, site, sites


def _split(vlm, role: str) -> tuple[str, str, bool]:
    """(stack, part, indexed) of a role: a role whose path has ``{i}`` lives in the longest
    layer stack it starts with; the others are a stack of their own."""
    base = role.removesuffix(".probs")
    if "{i}" not in vlm.ROLES[base]:
        return role, "", False
    stack = max((s for s in vlm.LAYER_LISTS if role.startswith(s)), key=len)
    return stack, role[len(stack) :].lstrip("."), True


def test_round_trip_on_every_role_of_every_adapter(any_vlm):
    vlm = any_vlm
    probs = [r for r in vlm.roles if r.endswith(".probs")]
    assert probs, f"{vlm.name} declares no attention probabilities"
    for role in vlm.roles:
        stack, part, indexed = _split(vlm, role)
        if not indexed:
            text = site(role)
            assert text == role and Site.parse(text) == Site(role)
            assert parse_site(text) == (role, None)
            vlm.resolve(text)
            continue
        n = vlm.num_layers(stack)
        for layer in (0, -1):
            text = site(stack, layer, part)
            parsed = Site.parse(text)
            assert parsed == Site(stack, layer, part) and str(parsed) == text
            assert parsed.role == role and parse_site(text) == (role, layer)
            assert text == (f"{stack}[{layer}].{part}" if part else f"{stack}[{layer}]")
        # the builder's strings resolve: some layer of the stack has the role (hybrid models
        # give a role such as ``.linear_attn`` or ``.cross_attn`` to some layers only)
        resolved = 0
        for i in range(n):
            try:
                vlm.resolve(site(stack, i, part))
                resolved += 1
            except SiteError:
                pass
        assert resolved, f"no layer of {stack} of {vlm.name} resolves {role}"
        assert sites(stack, range(n), part) == [site(stack, i, part) for i in range(n)]


@pytest.mark.parametrize(
    "text",
    [
        "lm.layer[3]",
        "lm.layer[-1].mlp.act",
        "vision.layer[0].attn.probs",
        "text.layer[11].attn.heads",
        "vision.global.layer[2].attn",
        "projector",
        "lm_head",
        "lm.embed.per_layer",
    ],
)
def test_parse_site_agrees_with_site_parse(text):
    parsed = Site.parse(text)
    assert parse_site(text) == (parsed.role, parsed.layer)
    assert str(parsed) == text == site(parsed.stack, parsed.layer, parsed.part)


def test_sites_takes_any_iterable_of_layers():
    assert sites("lm.layer", (2, 0), "attn.probs") == [
        "lm.layer[2].attn.probs",
        "lm.layer[0].attn.probs",
    ]
    assert sites("vision.layer", iter([1])) == ["vision.layer[1]"]
    assert sites("lm.layer", []) == []


@pytest.mark.parametrize(
    "stack, part",
    [
        ("", ""),
        ("Lm.layer", ""),
        ("lm..layer", ""),
        ("lm.layer.", ""),
        ("lm layer", ""),
        ("lm.layer[0]", ""),
        ("1m.layer", ""),
        ("lm.layer", "mlp act"),
        ("lm.layer", ".mlp"),
        ("lm.layer", "mlp.Act"),
    ],
)
def test_bad_names_raise_site_error(stack, part):
    with pytest.raises(SiteError, match="not a role name"):
        Site(stack, 0, part)
    with pytest.raises(SiteError, match="not a role name"):
        site(stack, None, part)


@pytest.mark.parametrize("layer", [1.0, 1.5, "3", True, False, [0]])
def test_non_integer_layers_raise_site_error(layer):
    with pytest.raises(SiteError, match="layer index is an integer"):
        Site("lm.layer", layer)
    with pytest.raises(SiteError, match="layer index is an integer"):
        site("lm.layer", layer, "mlp")
    with pytest.raises(SiteError, match="layer index is an integer"):
        sites("lm.layer", [0, layer])


@pytest.mark.parametrize(
    "text",
    [
        "",
        "lm.layer[1.5]",
        "lm.layer[x]",
        "lm.layer[]",
        "lm.layer[1][2]",
        "lm.layer[0]mlp",
        "lm.layer[0].",
        "lm.layer[0]..mlp",
        "[3]",
        "lm.layer[3].MLP",
        "lm.layer [3]",
    ],
)
def test_bad_site_strings_raise_site_error(text):
    with pytest.raises(SiteError):
        Site.parse(text)
    with pytest.raises(SiteError):
        parse_site(text)


def test_adapters_refuse_bad_site_strings_with_site_error(tiny_llava):
    for text in ("lm.layer[1.5]", "lm.layer[0]mlp", "lm.layer[0][1]", ""):
        with pytest.raises(SiteError):
            tiny_llava.resolve(text)
