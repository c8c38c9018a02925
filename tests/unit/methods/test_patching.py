"""Causal tracing / activation patching (Meng et al. 2022): invariants on tiny models, a
one-site-at-a-time reference built on ``core.hooks`` directly, and the world's truth on
toy-llava (noise on the image tokens is undone by restoring the evidence object's patches)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.core.targets import Predicted, Target, TokenId
from mmscope.methods.analysis import make_analysis
from mmscope.methods.layer.patching import PatchingResult, image_noise
from mmscope.methods.layer.tracing import CausalTrace
from mmscope.methods.token.sets import object_cells
from mmscope.world import make_samples, render
from mmscope.world.items import world_items
from mmscope.world.seeds import BENCH_SEED


@pytest.fixture(scope="module")
def images():
    from mmscope.world import sample_scenes

    return [render(s, 48).image for s in sample_scenes(2, 5)]


def _inputs(vlm, images, n=2):
    if vlm.contrastive:
        return vlm.prepare(images[:n], ["a red circle", "two blue squares here"][:n])
    return vlm.prepare(images[:n], ["what color is the circle ?", "how many squares ?"][:n])


def test_registered_as_a_layer_analysis():
    entry = REGISTRY.get("causal_trace", "analysis")
    assert entry.obj is CausalTrace
    assert (entry.level, entry.family, entry.paper) == (
        "model/layer",
        "inside/patching",
        "Meng et al. 2022",
    )
    made = make_analysis("causal_trace", preset="mlp", window=3)
    assert (made.preset, made.window) == ("mlp", 3)


@pytest.mark.parametrize(
    "settings",
    [
        {"preset": "neurons"},
        {"noise": -1.0},
        {"noise": float("nan")},
        {"window": 0},
        {"batch_size": 0},
        {"seed": -1},
        {"positions": "text"},
        {"positions": []},
    ],
)
def test_bad_settings_raise_input_error(settings):
    with pytest.raises(InputError):
        CausalTrace(**settings)


def test_bad_positions_and_counterfactual_raise(tiny_llava, images):
    inputs = _inputs(tiny_llava, images)
    with pytest.raises(InputError, match="outside"):
        CausalTrace(positions=[99])(tiny_llava, inputs)
    other = tiny_llava.prepare(images[:2], ["what color ?", "how many squares are there ?"])
    with pytest.raises(InputError, match="layout|spans"):
        CausalTrace()(tiny_llava, inputs, corrupted=other)


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "toy_llava"])
def test_restoring_the_last_layer_at_the_last_position_gives_one(name, request, images):
    """The last position's last residual is all the logits read: restoring it restores them."""
    vlm = request.getfixturevalue(name)
    result = CausalTrace(batch_size=16)(vlm, _inputs(vlm, images))
    gap = result.p_clean - result.p_corrupt
    assert np.all(np.abs(gap) > 0)
    last = result.effect[:, -1, -1]
    # p_restored equals p_clean up to float error: the effect is 1 up to that error / gap
    np.testing.assert_allclose(last * gap, gap, atol=1e-6)
    np.testing.assert_allclose(last, 1.0, atol=1e-6 / np.abs(gap).min())
    # nothing reads the last layer at earlier positions: effect 0
    np.testing.assert_allclose(result.effect[:, -1, :-1] * gap[:, None], 0.0, atol=1e-6)


def test_clip_restoring_the_class_token_at_the_last_layer_gives_one(tiny_clip, images):
    result = CausalTrace()(tiny_clip, _inputs(tiny_clip, images))
    assert result.settings["stack"] == "vision.layer"
    assert result.positions == tuple(range(17)) and result.skipped == ()
    gap = result.p_clean - result.p_corrupt
    np.testing.assert_allclose(result.effect[:, -1, 0] * gap, gap, atol=1e-5)
    np.testing.assert_allclose(result.effect[:, -1, 1:] * gap[:, None], 0.0, atol=1e-5)


def test_identical_counterfactual_leaves_nothing_to_restore(tiny_llava, images):
    """corrupted == clean: p_clean == p_corrupt, and every effect is NaN (documented)."""
    inputs = _inputs(tiny_llava, images)
    result = CausalTrace()(tiny_llava, inputs, corrupted=inputs)
    np.testing.assert_array_equal(result.p_clean, result.p_corrupt)
    assert np.isnan(result.effect).all()
    assert result.settings["corruption"] == "counterfactual"
    assert json.dumps(result.to_dict(), allow_nan=False)  # NaN becomes null


def _reference(vlm, inputs, ids, units, seed=0, scale=3.0):
    """One unbatched forward per restoration with ``core.hooks.patch``; noise drawn by the
    documented recipe (per item: seed, ``scale`` x sd of the item's image-token embeddings)."""
    sites = sorted({s for unit in units for s, *_ in unit})
    index = torch.tensor(ids)

    def prob(logits):
        return torch.softmax(logits[:, -1].float(), -1).gather(1, index[:, None])[:, 0]

    with torch.no_grad(), capture(vlm, [*sites, "projector"]) as cap:
        p_clean = prob(vlm.forward(inputs).logits)
    tokens = cap["projector"]  # LLaVA: (items, image tokens, dim)
    noise = torch.stack(
        [
            torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)) * scale * t.std()
            for t in tokens
        ]
    )
    noisy = {"projector": lambda v: v + noise}
    with torch.no_grad(), patch(vlm, noisy):
        p_corrupt = prob(vlm.forward(inputs).logits)
    out = []
    for unit in units:

        def restorer(site, unit=unit):
            def fn(v):
                v = v.clone()
                for s, positions, (lo, hi) in unit:
                    if s == site:
                        v[:, list(positions), lo:hi] = cap[site][:, list(positions), lo:hi]
                return v

            return fn

        with torch.no_grad(), patch(vlm, {**noisy, **{s: restorer(s) for s, *_ in unit}}):
            out.append(prob(vlm.forward(inputs).logits))
    restored = torch.stack(out)  # (units, items)
    return ((restored - p_corrupt) / (p_clean - p_corrupt)).T.numpy()  # (items, units)


@pytest.mark.parametrize("preset", ["residual", "mlp", "attn", "head"])
def test_batched_trace_equals_a_one_site_loop(tiny_llava, images, preset):
    inputs = _inputs(tiny_llava, images)  # two prompts of different length: left padding
    ids = Predicted().token_ids(tiny_llava, inputs)
    result = CausalTrace(preset=preset, batch_size=6, window=2, seed=3)(
        tiny_llava, inputs, TokenId(ids)
    )
    length, dim = inputs.input_ids.shape[1], 32
    if preset == "head":
        width = dim // 2
        units = [
            [(f"lm.layer[{k}].attn.heads", range(length), (h * width, (h + 1) * width))]
            for k in range(2)
            for h in range(2)
        ]
        shape = (2, 2, 2)
    else:
        suffix = "" if preset == "residual" else f".{preset}"
        layers = {"residual": [[0], [1]], "mlp": [[0], [0, 1]], "attn": [[0], [0, 1]]}[preset]
        positions = [p for p in range(length) if p not in result.skipped]
        units = [
            [(f"lm.layer[{j}]{suffix}", [p], (0, dim)) for j in layers[k]]
            for k in range(2)
            for p in positions
        ]
        shape = (2, 2, len(positions))
        assert result.skipped == (0,)  # before the image: untouched by its noise
        np.testing.assert_array_equal(result.effect[:, :, 0], 0.0)
    expected = _reference(tiny_llava, inputs, ids, units, seed=3).reshape(shape)
    got = result.effect if preset == "head" else result.effect[:, :, 1:]
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=1e-3)


def test_noise_is_seeded_and_independent_of_the_batch(tiny_llava, images):
    prompt = "what color is the circle ?"
    both = tiny_llava.prepare(images[:2], [prompt, prompt])
    trace = CausalTrace(seed=7, positions="image")
    batched = trace(tiny_llava, both)
    again = trace(tiny_llava, both)
    np.testing.assert_array_equal(batched.effect, again.effect)
    alone = trace(tiny_llava, tiny_llava.prepare(images[1], prompt))
    np.testing.assert_allclose(batched.effect[1], alone.effect[0], atol=1e-4)
    other = CausalTrace(seed=8, positions="image")(tiny_llava, both)
    assert not np.allclose(other.p_corrupt, batched.p_corrupt)
    # the documented noise: per item, seeded, scale x the item's sd
    tokens = torch.randn(20, 4) * 5
    noise = image_noise(tokens, [8, 12], 3.0, seed=7)
    torch.testing.assert_close(
        noise[:8],
        torch.randn(8, 4, generator=torch.Generator().manual_seed(7)) * 3 * tokens[:8].std(),
    )


class _Flaky(Target):
    """A next-token target whose scoring raises after ``after`` forwards."""

    def __init__(self, after):
        self.after, self.calls = after, 0

    def bind(self, vlm, inputs):
        bound = TokenId(0).bind(vlm, inputs)

        def score(output):
            self.calls += 1
            if self.calls > self.after:
                raise RuntimeError("midway")
            return bound.score(output)

        return replace(bound, score=score)


def test_model_state_unchanged_also_when_a_forward_raises(tiny_llava, images):
    inputs = _inputs(tiny_llava, images)
    before = model_state(tiny_llava.model)
    CausalTrace(preset="head")(tiny_llava, inputs)
    assert model_state(tiny_llava.model) == before
    with pytest.raises(RuntimeError, match="midway"):  # raises in the first restored run
        CausalTrace(batch_size=4)(tiny_llava, inputs, _Flaky(after=2))
    assert model_state(tiny_llava.model) == before
    # a layer that raises inside the third forward (the first restored one)
    calls = []

    def boom(module, args, output):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("inside")

    handle = tiny_llava.resolve("lm.layer[1].mlp").register_forward_hook(boom)
    try:
        with_hook = model_state(tiny_llava.model)
        with pytest.raises(RuntimeError, match="inside"):
            CausalTrace(preset="mlp")(tiny_llava, inputs)
        assert model_state(tiny_llava.model) == with_hook
    finally:
        handle.remove()
    assert model_state(tiny_llava.model) == before


@pytest.mark.parametrize("preset", ["residual", "mlp", "attn", "head"])
def test_runs_on_every_architecture(any_vlm, images, preset):
    inputs = _inputs(any_vlm, images)
    before = model_state(any_vlm.model)
    result = CausalTrace(preset=preset, batch_size=8)(any_vlm, inputs)
    assert model_state(any_vlm.model) == before
    layers = any_vlm.num_layers(result.settings["stack"])
    width = (
        any_vlm.num_heads(result.settings["stack"]) if preset == "head" else len(result.positions)
    )
    assert result.effect.shape == (2, layers, width)
    # layers whose heads are not self-attention (Mllama's cross-attention layers) are NaN
    no_heads = [int(k.split("[")[1][:-1]) for k in result.settings.get("skipped_layers", {})]
    assert np.isfinite(np.delete(result.effect, no_heads, axis=1)).all()
    assert np.isnan(result.effect[:, no_heads]).all()
    assert result.p_clean.shape == result.p_corrupt.shape == (2,)
    assert len(result.tokens[0]) == len(result.positions)
    assert json.dumps(result.to_dict(), allow_nan=False)
    assert result.plot() is not None
    if preset != "head" and not result.image_spans[0]:  # images behind cross-attention
        with pytest.raises(InputError, match="cross-attention"):
            result.image_effect(0)
    elif preset != "head":
        span = result.image_spans[0][0]
        assert result.image_effect(0).shape == span.grid
        mass = result.mass_inside(np.ones(span.grid, bool))
        if result.image_effect(0).any():
            assert mass == pytest.approx(1.0)
        else:  # nothing restored anything at the image (tiny Qwen2.5-VL's attention): no mass
            assert np.isnan(mass)


def _answered(vlm, n, gap=0.3):
    """World items the toy answers right whose answer the image-token noise changes."""
    items = [it for it in world_items(n) if it.mask is not None and it.mask.any()]
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    ids = Predicted().token_ids(vlm, inputs)
    quick = CausalTrace(positions=[-1])(vlm, inputs, TokenId(ids))
    words = [vlm.tokenizer.decode([i]).strip().lower() for i in ids]
    return [
        (it, i)
        for it, i, word, drop in zip(items, ids, words, quick.p_clean - quick.p_corrupt)
        if word == it.answer.split()[0].lower() and drop > gap
    ]


def test_toy_llava_early_layer_effect_sits_on_the_evidence_object(toy_llava):
    """Meng et al.'s picture on the world: at the first layer, restoring the evidence
    object's patches undoes the image noise, far beyond the object's share of the image."""
    chosen = _answered(toy_llava, 40)[:8]
    assert len(chosen) == 8
    inputs = toy_llava.prepare([it.image for it, _ in chosen], [it.prompt for it, _ in chosen])
    result = CausalTrace(positions="image")(toy_llava, inputs, TokenId([i for _, i in chosen]))
    mass, share = [], []
    for b, (it, _) in enumerate(chosen):
        cells = object_cells(it.mask, result.image_spans[b][0])
        mass.append(result.mass_inside(cells, item=b, layer=0))
        share.append(cells.mean())
    # measured: mean mass 0.62 against a mean share 0.12; 8 of 8 items above their share
    assert np.mean(mass) > 3 * np.mean(share)
    assert sum(m > s for m, s in zip(mass, share)) >= 7


def _recoloured(toy_llava):
    """(clean, counterfactual, evidence mask, answer id) for colour questions the toy answers
    right: the evidence object recoloured, everything else the same."""
    for sample in make_samples(40, BENCH_SEED):
        for q in sample.questions:
            if q.type != "color":
                continue
            (j,) = q.evidence
            clean = toy_llava.prepare(sample.image, q.text)
            (answer,) = Predicted().token_ids(toy_llava, clean)
            if toy_llava.tokenizer.decode([answer]).strip() != q.answer:
                continue
            other = "blue" if q.answer != "blue" else "red"
            objects = tuple(
                replace(o, color=other) if k == j else o for k, o in enumerate(sample.scene.objects)
            )
            image = render(replace(sample.scene, objects=objects), 48).image
            yield clean, toy_llava.prepare(image, q.text), sample.masks[j], answer


def test_toy_llava_counterfactual_colour_points_at_the_recoloured_object(toy_llava):
    """A world image whose evidence object has another colour (Palit et al.'s counterfactual
    corruption): restoring that object's patches at the first layer gives the answer back."""
    mass, share = [], []
    for clean, corrupted, mask, answer in _recoloured(toy_llava):
        if len(mass) == 4:
            break
        trace = CausalTrace(positions="image")
        result = trace(toy_llava, clean, TokenId(answer), corrupted=corrupted)
        if result.p_clean[0] - result.p_corrupt[0] < 0.3:
            continue  # the recolouring did not change the answer: nothing to trace
        cells = object_cells(mask, result.image_spans[0][0])
        mass.append(result.mass_inside(cells, layer=0))
        share.append(cells.mean())
    # measured: masses 0.65, 1.00, 1.00, 1.00 against shares 0.14, 0.19, 0.11, 0.11 (the first
    # 7 colour questions answered right; 3 of them left the answer nearly unchanged)
    assert len(mass) == 4
    assert np.mean(mass) > 3 * np.mean(share)
    assert all(m > s for m, s in zip(mass, share))


def test_result_maps_and_plot(tiny_llava, images):
    result = CausalTrace(positions="image")(tiny_llava, _inputs(tiny_llava, images, 1))
    assert isinstance(result, PatchingResult)
    span = result.image_spans[0][0]
    assert result.positions == tuple(span.positions)
    grid = result.image_effect(0)
    np.testing.assert_allclose(grid.ravel(), result.effect[0].max(0))
    np.testing.assert_allclose(result.image_effect(0, layer=1).ravel(), result.effect[0, 1])
    fig = result.plot()
    assert len(fig.axes) >= 2  # heat map (+ colour bar) and the image-patch map
    assert result.tokens[0][0] == "img0 0,0"
    head = CausalTrace(preset="head")(tiny_llava, _inputs(tiny_llava, images))
    with pytest.raises(InputError):
        head.image_effect(0)
