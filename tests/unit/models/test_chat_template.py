"""A chat template that renders at load but fails for one prompt fails at prepare with one
typed line, never a jinja2 traceback."""

from __future__ import annotations

import pytest

from mmscope.core.errors import ChatTemplateError
from mmscope.toys.tiny import build_tiny

PICKY = (
    "{% for m in messages %}{% for part in m['content'] %}"
    "{% if part['type'] == 'text' and 'boom' in part['text'] %}"
    "{{ raise_exception('this template refuses boom') }}{% endif %}{% endfor %}{% endfor %}"
    "USER: <image>\n{{ messages[0]['content'][-1]['text'] }} ASSISTANT:"
)


def test_a_template_that_fails_for_one_prompt_is_one_typed_error(scene_image):
    vlm = build_tiny("tiny_llava")
    vlm.processor.chat_template = PICKY
    assert vlm.prepare(scene_image, "what color is the circle ?").batch_size == 1
    with pytest.raises(ChatTemplateError, match="does not render: this template refuses boom"):
        vlm.prepare(scene_image, "boom ?")
