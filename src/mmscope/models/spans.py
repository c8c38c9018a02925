"""Finding image and prompt spans in a processed sequence, shared by the decoder adapters."""

from __future__ import annotations

import warnings
from typing import Any

import torch


def image_runs(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """Maximal runs ``[start, end)`` of ``image_token_id`` in a 1-D id tensor."""
    flags = torch.zeros(ids.numel() + 2, dtype=torch.int8)
    flags[1:-1] = (ids.reshape(-1) == image_token_id).to(torch.int8)
    edges = torch.nonzero(flags.diff()).view(-1).tolist()  # starts (0 -> 1) and ends (1 -> 0)
    return list(zip(edges[0::2], edges[1::2]))


def prompt_positions(
    tokenizer: Any,
    text: str,
    prompt: str,
    expanded: torch.Tensor,
    image_token_id: int,
    runs: list[tuple[int, int]],
) -> tuple[tuple[int, int], tuple[str, ...]]:
    """Positions of ``prompt``'s tokens in the expanded (image tokens repeated) sequence.

    Tokenises the unexpanded ``text`` with character offsets, then walks it, counting each
    image placeholder as its whole run. Returns ``((0, 0), ())`` with a warning when the
    walk does not reproduce ``expanded`` (an unusual processor).
    """
    char_start = text.rfind(prompt)
    enc = tokenizer(text, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    pad_offset = int(runs[0][0]) if runs else 0
    pos, run_index, rebuilt, inside = 0, 0, [], []
    for tok, (a, b) in zip(ids, offsets):
        if tok == image_token_id and run_index < len(runs):
            length = runs[run_index][1] - runs[run_index][0]
            if run_index == 0:
                pad_offset = runs[0][0] - pos
            rebuilt.extend([tok] * length)
            pos += length
            run_index += 1
            continue
        if char_start >= 0 and b > a and a >= char_start and b <= char_start + len(prompt):
            inside.append(pos)
        rebuilt.append(tok)
        pos += 1
    if not runs:
        pad_offset = len(expanded) - len(rebuilt)
    window = expanded[pad_offset : pad_offset + len(rebuilt)].tolist()
    if window != rebuilt or not inside:
        warnings.warn("could not locate the prompt's tokens in the sequence", stacklevel=3)
        return (0, 0), ()
    start, end = pad_offset + inside[0], pad_offset + inside[-1] + 1
    tokens = tuple(tokenizer.convert_ids_to_tokens(expanded[start:end].tolist()))
    return (start, end), tokens


def resize_crop_box(
    width: int, height: int, shortest_edge: int | None, crop: tuple[int, int] | None
) -> tuple[float, float, float, float]:
    """Box of the original image kept by "resize shortest edge, then centre crop"."""
    if shortest_edge is None or crop is None:
        return (0.0, 0.0, float(width), float(height))
    scale = shortest_edge / min(width, height)
    crop_h, crop_w = crop
    left = max(0.0, (width * scale - crop_w) / 2) / scale
    top = max(0.0, (height * scale - crop_h) / 2) / scale
    return (left, top, left + min(crop_w / scale, width), top + min(crop_h / scale, height))
