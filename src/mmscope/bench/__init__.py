"""The benchmark: score every explanation method against the world's truth (the leaderboard).

``world_items`` lives in ``mmscope.world.items`` (with ``BenchItem``); it is re-exported here
because ``from mmscope.bench import BenchConfig, run_leaderboard, world_items`` is the
documented way in.
"""

from mmscope.bench.items import load_items
from mmscope.bench.leaderboard import BenchConfig, aggregate, run_leaderboard
from mmscope.world.items import world_items  # public re-export (README)

__all__ = [
    "BenchConfig",
    "aggregate",
    "load_items",
    "run_leaderboard",
    "world_items",
]
