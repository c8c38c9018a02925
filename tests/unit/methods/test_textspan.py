"""TextSpan: the per-head/MLP decomposition sums to CLIP's image features, per-token pieces sum
to their head, the greedy choice finds a planted direction, mean-ablating everything gives the
mean embedding, and on toy-clip the heads' texts explain far more variance than random
directions while mean-ablating all heads costs accuracy and the first layer's heads do not."""

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.state import model_state
from mmscope.methods.embedding.clip_embed import text_embeddings
from mmscope.methods.embedding.textspan import TextSpan, greedy_texts, zero_shot
from mmscope.methods.embedding.textspan_decompose import decompose, token_contributions
from mmscope.methods.study import study
from mmscope.world.items import world_items
from mmscope.world.scene import COLORS, SHAPES


def _pixels(vlm, n=4, seed=1):
    return vlm.pixel_values_of([it.image for it in world_items(n, seed, contrastive=True)])


@pytest.mark.parametrize("name", ["tiny_clip", "toy_clip"])
def test_decomposition_sums_to_the_image_features(name, request):
    vlm = request.getfixturevalue(name)
    pixels = _pixels(vlm)
    parts = decompose(vlm, pixels)
    vision = vlm.model.vision_model
    with torch.no_grad():
        features = vlm.model.get_image_features(pixel_values=pixels).pooler_output.numpy()
        # the embedding term by hand: the class token after the pre-norm, through the final
        # LayerNorm linearised with each image's own std, and the projection
        r0 = vision.pre_layrnorm(vision.embeddings(pixels))[:, 0]
        final = vision(pixel_values=pixels).last_hidden_state[:, 0]
        norm = vision.post_layernorm
        sigma = torch.sqrt(final.var(-1, unbiased=False) + norm.eps)[:, None]
        centred = (r0 - r0.mean(-1, keepdim=True)) / sigma * norm.weight
        by_hand = centred @ vlm.model.visual_projection.weight.T
    np.testing.assert_allclose(parts.total(), features, atol=1e-4)
    np.testing.assert_allclose(parts.embed, by_hand.numpy(), atol=1e-4)
    layers, heads = vlm.num_layers("vision.layer"), vlm.num_heads("vision.layer")
    assert parts.heads.shape == (4, layers, heads, features.shape[1])
    if name == "tiny_clip":
        for layer in range(layers):
            tokens = token_contributions(vlm, pixels, layer)
            assert (
                tokens.shape[2]
                == 1 + (pixels.shape[-1] // vlm.model.config.vision_config.patch_size) ** 2
            )
            np.testing.assert_allclose(tokens.sum(2), parts.heads[:, layer], atol=1e-5)


def test_greedy_picks_the_text_that_carries_the_variance():
    rng = np.random.default_rng(0)
    texts = rng.normal(size=(12, 16))
    texts /= np.linalg.norm(texts, axis=1, keepdims=True)
    # all variance along text 7, plus a tiny amount along text 2
    data = np.outer(rng.normal(size=50), texts[7]) + 0.01 * np.outer(rng.normal(size=50), texts[2])
    chosen = greedy_texts(data + 3.0, texts, m=3, rank=16)  # an offset: centring removes it
    assert chosen[0][0] == 7
    assert chosen[0][1] > 0.99
    assert sum(s for _, s in chosen) <= 1 + 1e-9
    # the rank-1 span is text 7's direction: the others project to (nearly) nothing
    assert greedy_texts(data, texts, m=1, rank=1)[0][0] == 7


def test_mean_ablating_everything_gives_the_mean_embedding(tiny_clip):
    parts = decompose(tiny_clip, _pixels(tiny_clip, 5, 2))
    layers, heads = parts.heads.shape[1:3]
    every = parts.ablated(np.ones((layers, heads), bool), np.ones(layers, bool), embed=True)
    np.testing.assert_allclose(
        every, np.broadcast_to(parts.total().mean(0), every.shape), atol=1e-5
    )
    np.testing.assert_allclose(parts.ablated(), parts.total())
    one = np.zeros((layers, heads), bool)
    one[1, 0] = True
    expected = parts.total() - parts.heads[:, 1, 0] + parts.heads[:, 1, 0].mean(0)
    np.testing.assert_allclose(parts.ablated(heads=one), expected, atol=1e-6)


def test_study_on_tiny_clip_by_hand_and_leaves_the_model(tiny_clip):
    items = world_items(6, seed=4, contrastive=True)
    before = model_state(tiny_clip.model)
    result = study("textspan", tiny_clip, items, m=2, captions=5)
    assert model_state(tiny_clip.model) == before
    assert result.layers == (0, 1) and set(result.texts) == {(i, h) for i in (0, 1) for h in (0, 1)}
    assert result.head_variance.sum() == pytest.approx(1.0)
    # accuracy (right when the class names an object in the scene), recomputed from the
    # decomposition
    parts = decompose(tiny_clip, tiny_clip.pixel_values_of([it.image for it in items]))
    from mmscope.methods.embedding.clip_embed import spelled

    names = [f"a {c} {s}" for c in COLORS for s in SHAPES]
    classes = spelled(tiny_clip, names)[0]  # the study keeps the labels its tokenizer spells
    emb = text_embeddings(tiny_clip, classes, items[0].image).numpy()
    pred = zero_shot(parts.total(), emb)

    def right(pred):
        return np.mean(
            [classes[j][2:] in {o.name for o in it.scene.objects} for it, j in zip(items, pred)]
        )

    assert result.accuracy == pytest.approx(right(pred))
    mlp = np.array([False, True])
    ablated = right(zero_shot(parts.ablated(mlps=mlp), emb))
    assert dict(result.ablation)["L1.mlp"] == pytest.approx(ablated)
    tables = result.tables()
    assert len(tables["ablation"]["component"]) == len(result.ablation)
    assert result.plot() is not None and result.to_dict()["study"] == "textspan"


def test_refuses_decoders_and_bad_input(tiny_llava, tiny_qwen2_vl, tiny_clip):
    for vlm in (tiny_llava, tiny_qwen2_vl):
        with pytest.raises(NotApplicableError):
            study("textspan", vlm, world_items(2))
    with pytest.raises(InputError):
        TextSpan(m=0)
    with pytest.raises(InputError):
        study("textspan", tiny_clip, world_items(1, contrastive=True))


def test_toy_clip_heads_have_texts_and_only_late_heads_matter(toy_clip):
    n, seed = 96, 11
    items = world_items(n, seed, contrastive=True)
    result = study("textspan", toy_clip, items)
    # measured (n 96, seed 11): zero-shot accuracy 0.615; mean-ablating all heads costs 0.323,
    # the first layer's heads 0.010, all MLPs -0.031
    assert result.drop("all heads") > 0.2
    assert abs(result.drop("L0 heads")) < 0.08
    # the 5 texts of each last-layer head remove 0.735-0.809 of its variance; as many random
    # unit directions (same pool size) remove only 0.21-0.27
    parts = decompose(toy_clip, toy_clip.pixel_values_of([it.image for it in items]))
    scale = np.linalg.norm(parts.total(), axis=-1)[:, None]
    random = np.random.default_rng(0).normal(size=(64, parts.heads.shape[-1]))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    for head in range(4):
        text_share = sum(s for _, s in result.texts[(3, head)])
        random_share = sum(
            s for _, s in greedy_texts(parts.heads[:, 3, head] / scale, random, 5, 80)
        )
        assert text_share > 0.6 and text_share > 2 * random_share
