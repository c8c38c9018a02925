"""Decoders (greedy, sampling, beam) and hallucination-mitigating ones (VCD, OPERA), all
registered under kind "decoder"; importing this registers them."""

from mmscope.decoding import opera, standard, vcd  # noqa: F401  (importing registers them)
from mmscope.decoding.base import Decoder, decoders, generate, make_decoder

__all__ = ["Decoder", "decoders", "generate", "make_decoder"]
