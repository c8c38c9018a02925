"""Registered methods, in folders by the survey's levels; importing this registers them."""

from mmscope.methods import attribution, layer, token  # noqa: F401
