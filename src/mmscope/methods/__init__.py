"""Registered methods, in folders by the survey's levels; importing this registers them."""

from mmscope.methods import attribution, embedding, layer, neuron, token  # noqa: F401
