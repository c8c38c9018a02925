"""The item type and the seeds have one home (``world.items``, ``world.seeds``)."""

import ast
from pathlib import Path

import mmscope
from mmscope.world import seeds
from mmscope.world.items import world_items


def test_every_named_seed_is_distinct():
    named = {k: v for k, v in vars(seeds).items() if k.endswith("_SEED")}
    assert set(named) == set(seeds.__all__)
    assert len(set(named.values())) == len(named)


def test_bench_keeps_the_documented_world_items():
    from mmscope.bench import world_items as public

    assert public is world_items


def test_toy_evaluation_and_the_hallucination_metrics_do_not_import_each_other():
    src = Path(mmscope.__file__).parent
    metrics = ast.unparse(ast.parse((src / "metrics" / "hallucination.py").read_text()))
    assert "mmscope.toys" not in metrics
