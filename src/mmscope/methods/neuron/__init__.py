"""Neuron-level methods: statistics over datasets, DAPE, MINER, knowledge neurons,
dissection and editing (the survey's neuron level)."""

from mmscope.methods.neuron import (  # noqa: F401  (importing registers them)
    clip_dissect,
    dape,
    dissect,
    edit,
    knowledge,
    miner,
    stats,
)
