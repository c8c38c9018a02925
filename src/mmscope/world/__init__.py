"""A seeded synthetic world of simple scenes with exact ground truth.

Scenes of coloured shapes in image quadrants, rendered at any resolution with per-object
masks, plus templated questions, captions, POPE probes and concept labels, used to train
tiny vision-language models and to score explanations against ground truth.
"""

from mmscope.world.concepts import (
    concept_vocabulary,
    image_concepts,
    patch_concepts,
    patch_objects,
)
from mmscope.world.dataset import WorldSample, export_dataset, load_dataset, make_samples
from mmscope.world.pope import POPE_SPLITS, PopeQuestion, pope_questions
from mmscope.world.questions import (
    DESCRIBE_PROMPT,
    NUMBERS,
    QUESTION_TYPES,
    Question,
    ask,
    caption,
    questions,
    unanswerable,
    vocabulary,
)
from mmscope.world.render import Rendered, render
from mmscope.world.rle import decode_rle, encode_rle
from mmscope.world.scene import (
    COLORS,
    SHAPES,
    SIZES,
    SLOTS,
    STYLES,
    Scene,
    WorldConfig,
    WorldObject,
    sample_scene,
    sample_scenes,
)

__all__ = [
    "COLORS",
    "DESCRIBE_PROMPT",
    "NUMBERS",
    "POPE_SPLITS",
    "QUESTION_TYPES",
    "SHAPES",
    "SIZES",
    "SLOTS",
    "STYLES",
    "PopeQuestion",
    "Question",
    "Rendered",
    "Scene",
    "WorldConfig",
    "WorldObject",
    "WorldSample",
    "ask",
    "caption",
    "decode_rle",
    "encode_rle",
    "export_dataset",
    "concept_vocabulary",
    "image_concepts",
    "load_dataset",
    "make_samples",
    "patch_concepts",
    "patch_objects",
    "pope_questions",
    "questions",
    "render",
    "sample_scene",
    "sample_scenes",
    "unanswerable",
    "vocabulary",
]
