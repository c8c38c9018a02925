"""Neuron-level methods: statistics over datasets, DAPE, MINER, knowledge neurons,
dissection and editing (the survey's neuron level)."""
