"""Reading object mentions back out of a caption (for CHAIR-style hallucination counts)."""

from __future__ import annotations

from mmscope.world.scene import COLORS, SHAPES, Scene


def caption_objects(text: str) -> list[str]:
    """The ``"color shape"`` names mentioned in a caption, in order, duplicates kept.

    A mention is a colour word directly followed by a shape word, as the world's captions
    are written ("a red circle and a blue square").
    """
    words = text.lower().replace(",", " , ").split()
    return [f"{a} {b}" for a, b in zip(words, words[1:]) if a in COLORS and b in SHAPES]


def hallucinated(text: str, scene: Scene) -> list[str]:
    """Mentions in ``text`` of objects that are not in ``scene``."""
    present = {obj.name for obj in scene.objects}
    return [name for name in caption_objects(text) if name not in present]
