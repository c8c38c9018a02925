"""Every named seed of the world, in one place, so no two uses draw the same scenes by accident.

Each is the seed of ``sample_scenes`` / ``make_samples`` (and of the ``numpy`` generator beside
them where one is needed). Training, held-out evaluation and the benchmark never share one.
"""

#: Training scenes of the toys: ``mmscope train-toy`` draws from ``TRAIN_SEED + recipe.seed``.
TRAIN_SEED = 1000
#: Held-out evaluation scenes: ``mmscope toys eval``, and the POPE and CHAIR metrics' default.
EVAL_SEED = 777_000
#: Benchmark world items (``world_items``, the leaderboard, the decoder comparison).
BENCH_SEED = 424_242
#: Images and questions of ``mmscope demo``'s main section.
DEMO_SEED = 2024
#: The demo's "decoding" section: the scenes searched for a hallucinating caption.
CAPTION_SEED = 4242
#: The demo's "inside the model" section: its world questions.
INSIDE_SEED = 31
#: The demo's "neurons and concepts" section: its world items (``+ 1``: the edit's held-out ones).
NEURONS_SEED = 37

__all__ = [
    "BENCH_SEED",
    "CAPTION_SEED",
    "DEMO_SEED",
    "EVAL_SEED",
    "INSIDE_SEED",
    "NEURONS_SEED",
    "TRAIN_SEED",
]
