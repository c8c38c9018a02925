"""Pointing game, relevance mass and relevance rank, computed by hand and on the world."""

import numpy as np
import pytest

from mmscope.bench.baselines import OracleMap, RandomMap
from mmscope.core.targets import Predicted
from mmscope.metrics import Case
from mmscope.metrics.localisation import PointingGame, RelevanceMass, RelevanceRank
from mmscope.world.items import world_items

MASK = np.zeros((10, 10), dtype=bool)
MASK[2:4, 2:4] = True  # 4 pixels


def test_relevance_mass_and_rank_by_hand():
    heat = np.zeros((10, 10))
    heat[2, 2], heat[2, 3] = 3.0, 1.0  # inside: 4
    heat[8, 8], heat[0, 9] = 4.0, -5.0  # outside: 4 positive, the negative one ignored
    assert RelevanceMass().score(heat, MASK) == pytest.approx(0.5)
    # top-4 pixels: (8,8)=4, (2,2)=3, (2,3)=1, then the first 0 in raster order (0,0): 2 of 4 in
    assert RelevanceRank().score(heat, MASK) == pytest.approx(0.5)
    assert RelevanceMass().score(-np.ones((10, 10)), MASK) == 0.0


def test_pointing_game_with_and_without_tolerance():
    heat = np.zeros((10, 10))
    heat[5, 5] = 1.0  # two pixels diagonal off the mask's corner (3, 3)
    assert PointingGame(tolerance=0.0).score(heat, MASK) == 0.0
    assert PointingGame(tolerance=0.3).score(heat, MASK) == 1.0  # grown by 3 pixels
    heat[2, 2] = 1.0  # a tie: any maximum in the mask counts
    assert PointingGame(tolerance=0.0).score(heat, MASK) == 1.0


@pytest.fixture(scope="module")
def toy():
    from mmscope.models import load

    vlm = load("toy-llava")
    items = [it for it in world_items(40) if it.mask is not None][:20]
    return vlm, items, vlm.prepare([it.image for it in items], [it.prompt for it in items])


@pytest.mark.parametrize("metric", [PointingGame(), RelevanceMass(), RelevanceRank()])
def test_the_true_mask_localises_far_better_than_a_random_map(toy, metric):
    vlm, items, inputs = toy
    masks = tuple(it.mask for it in items)
    got = {}
    for baseline in (OracleMap(masks), RandomMap(range(len(items)))):
        exp = baseline(vlm, inputs, Predicted())
        got[baseline.key] = metric(Case(vlm, inputs, Predicted(), exp, baseline, masks)).mean()
    assert got["oracle"] > got["random"] + 0.25


def test_items_without_a_mask_score_nan(toy):
    vlm, items, inputs = toy
    exp = RandomMap(range(len(items)))(vlm, inputs, Predicted())
    masks = (None,) * len(items)
    assert np.all(np.isnan(RelevanceMass()(Case(vlm, inputs, Predicted(), exp, None, masks))))
