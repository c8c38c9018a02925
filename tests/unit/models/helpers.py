"""What the adapter tests share: every role resolves to its module type, a saved folder loads
back through ``mmscope.load`` to the same model, bad sites are refused, a rebuild is alike,
generation's scores are teacher forcing's; noise images and the LM's input embeddings."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import mmscope
from mmscope.core.errors import SiteError
from mmscope.core.hooks import patch
from mmscope.core.inputs import Inputs


def assert_roles_resolve(vlm: Any, expected: dict[str, type]) -> None:
    """Each role of ``expected`` (its first layer, for a per-layer role) resolves to a module
    of its type."""
    for role, cls in expected.items():
        site = role.replace(".layer", ".layer[0]") if ".layer" in role else role
        module = vlm.resolve(site)
        assert isinstance(module, cls), (role, type(module))


def saved_and_loaded(vlm: Any, folder: Path) -> Any:
    """``vlm``'s model and processor saved to ``folder``, loaded back by ``mmscope.load``."""
    vlm.model.save_pretrained(folder)
    vlm.processor.save_pretrained(folder)
    return mmscope.load(str(folder))


def assert_same_run(loaded: Any, vlm: Any, images: Any, prompt: Any) -> Inputs:
    """``loaded`` and ``vlm`` prepare ``images`` and ``prompt`` to the same ids and spans and
    give the same logits; ``loaded``'s inputs."""
    a_in, b_in = loaded.prepare(images, prompt), vlm.prepare(images, prompt)
    assert torch.equal(a_in.input_ids, b_in.input_ids) and a_in.image_spans == b_in.image_spans
    with torch.no_grad():
        a, b = loaded.forward(a_in).logits, vlm.forward(b_in).logits
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    return a_in


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    """A ``width`` x ``height`` image of uniform random pixels, seeded."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def lm_input(vlm: Any, inputs: Inputs, patches: dict | None = None) -> torch.Tensor:
    """The embeddings the language model's first layer receives (image features scattered
    in), with ``patches`` applied."""
    seen = []
    layer = vlm.model.model.language_model.layers[0]
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), patch(vlm, patches or {}):
            vlm.forward(inputs)
    finally:
        handle.remove()
    return seen[0]


def embedding_x_gradient(vlm: Any, inputs: Inputs, target: Any) -> torch.Tensor:
    """``(batch, sequence)``: sum over features of the LM input times its gradient."""
    seen = []
    layer = vlm.model.model.language_model.layers[0]

    def keep(module: Any, args: Any) -> None:
        args[0].retain_grad()
        seen.append(args[0])

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            target.bind(vlm, inputs)(vlm.forward(inputs)).sum().backward()
    finally:
        handle.remove()
        vlm.model.zero_grad(set_to_none=True)
    return (seen[0] * seen[0].grad).sum(-1).detach()


def assert_sites_refused(vlm: Any, sites: Iterable[str], match: str | None = None) -> None:
    """Each of ``sites`` is refused with a ``SiteError`` (its message matching ``match``)."""
    for bad in sites:
        with pytest.raises(SiteError, match=match):
            vlm.resolve(bad)


def assert_rebuilt_alike(vlm: Any, build: Callable[[], Any]) -> Any:
    """``build()`` leaves the global random state as it was and gives ``vlm``'s parameters;
    the model it built."""
    state = torch.random.get_rng_state()
    other = build()
    assert torch.equal(torch.random.get_rng_state(), state)
    for (name, a), (_, b) in zip(
        vlm.model.named_parameters(), other.model.named_parameters(), strict=True
    ):
        assert torch.equal(a, b), name
    return other


def assert_teacher_forcing(vlm: Any, inputs: Inputs, first: int | None = None) -> None:
    """The scores of 3 greedily generated tokens are the logits a forward pass over the
    extended inputs gives at positions ``first`` to ``first + 2`` (by default the prompt's
    last position on)."""
    n = inputs.input_ids.shape[1]
    first = n - 1 if first is None else first
    with torch.no_grad():
        out = vlm.model.generate(
            **inputs.tensors,
            max_new_tokens=3,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
        )
        new = out.sequences[:, n:]
        forced = vlm.forward(inputs.extend(new)).logits[0, first : first + 3]
    assert torch.allclose(forced, torch.cat(out.scores), atol=1e-4)
