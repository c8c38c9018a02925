"""mmscope: explain and interpret multimodal large language models.

>>> import mmscope
>>> vlm = mmscope.load("toy-llava")
>>> inputs = vlm.prepare(image, "what color is the circle ?")
"""

from mmscope.core.errors import MMScopeError
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import REGISTRY, register
from mmscope.models import VLM, load

__version__ = "0.1.0"
__all__ = ["REGISTRY", "ImageSpan", "Inputs", "MMScopeError", "VLM", "load", "register"]
