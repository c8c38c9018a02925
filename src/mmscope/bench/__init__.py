"""The benchmark: score every explanation method against the world's truth (the leaderboard)."""

from mmscope.bench.items import BENCH_SEED, BenchItem, load_items, world_items
from mmscope.bench.leaderboard import BenchConfig, aggregate, run_leaderboard

__all__ = [
    "BENCH_SEED",
    "BenchConfig",
    "BenchItem",
    "aggregate",
    "load_items",
    "run_leaderboard",
    "world_items",
]
