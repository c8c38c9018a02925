"""Why did a hallucinated object appear? Its word explained with the attribution and
inside-the-model tools: the word's relevance over the image (where no such object is), the
logit lens at the position that produced it, and how much that position attended to the image
against the text before it (text-dominated attention precedes hallucinations: Huang et al.
2024; Leng et al. 2024)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.hooks import capture
from mmscope.core.sites import site
from mmscope.core.targets import TokenId
from mmscope.decoding.base import make_decoder
from mmscope.methods.analysis import Result, jsonable
from mmscope.methods.explain import make_method
from mmscope.methods.token.lens import LensResult, LogitLens
from mmscope.models.capabilities import softmax_only
from mmscope.world import DESCRIBE_PROMPT

if TYPE_CHECKING:
    from PIL import Image

    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM


@dataclass(frozen=True)
class HallucinationExplanation(Result):
    """One generated phrase explained at the position that produced its last word.

    Attributes:
        caption: the decoded text.
        phrase: the explained phrase (its last word is the explained token).
        position: index of that token among the generated ones.
        relevance: the attribution of the token over the image and prompt words.
        lens: the logit lens of the prefix (its last position produced the token).
        image_attention: per layer, the attention mass (mean over heads) that the producing
            position gives to the image tokens (NaN at a layer without softmax attention:
            hybrid models' linear-attention layers).
        text_attention: the same for the text before it (prompt and generated words).
    """

    caption: str
    phrase: str
    position: int
    relevance: Explanation
    lens: LensResult
    image_attention: np.ndarray
    text_attention: np.ndarray

    def to_dict(self) -> dict[str, Any]:
        lens = self.lens
        return jsonable(
            {
                "analysis": "hallucination",
                "caption": self.caption,
                "phrase": self.phrase,
                "position": self.position,
                "relevance": self.relevance.image_scores[0][0][0],
                "lens_target_prob": lens.target_probs[:, 0, -1],
                "lens_first_top_layer": lens.first_top_layer(0),
                "image_attention": self.image_attention,
                "text_attention": self.text_attention,
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """The relevance over the image, the word's probability by layer, and the attention
        mass on the image and on the text by layer."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 3.2))
        axes = fig.subplots(1, 3)
        heat = self.relevance.heatmap(0)
        axes[0].imshow(self.relevance.images[0][0])
        scale = float(np.abs(heat).max()) or 1.0
        axes[0].imshow(heat, cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=0.55)
        axes[0].set_axis_off()
        axes[0].set_title(f"{self.relevance.method}: “{self.phrase}”", fontsize=9)
        layers = list(self.lens.layers)
        axes[1].plot(layers, self.lens.target_probs[:, 0, -1], marker="o")
        axes[1].set_ylim(0, 1)
        axes[1].set_xlabel("layer", fontsize=8)
        axes[1].set_title(f"logit lens: p({self.phrase.split()[-1]})", fontsize=9)
        x = np.arange(len(self.image_attention))
        axes[2].bar(x - 0.2, self.image_attention, 0.4, label="image tokens")
        axes[2].bar(x + 0.2, self.text_attention, 0.4, label="text before")
        axes[2].set_xlabel("layer", fontsize=8)
        axes[2].set_title("attention of the producing position", fontsize=9)
        axes[2].legend(fontsize=7)
        fig.suptitle(self.caption, fontsize=9)
        fig.tight_layout()
        return fig


def _find(tokens: list[str], words: list[str]) -> int:
    """Index of the last word of the first occurrence of ``words`` in ``tokens`` (-1: none)."""
    clean = [t.lstrip("▁Ġ ").lower() for t in tokens]
    for i in range(len(clean) - len(words) + 1):
        if clean[i : i + len(words)] == words:
            return i + len(words) - 1
    return -1


def _attention(vlm: VLM, inputs: Inputs) -> tuple[np.ndarray, np.ndarray]:
    """Per layer, the last position's attention mass on the image tokens and on the text (NaN
    at the layers without softmax attention)."""
    n = vlm.num_layers("lm.layer")
    layers, _ = softmax_only(vlm, "lm.layer", range(n), "explain_hallucination")
    sites = [site("lm.layer", i, "attn.probs") for i in layers]
    with torch.no_grad(), capture(vlm, sites) as cap:
        vlm.forward(inputs)
    lm = [span for span in inputs.image_spans[0] if span.sequence == "lm"]
    image = [p for span in lm for p in span.positions]  # none where cross-attention reads it
    mask = inputs.attention_mask[0].bool().clone()
    mask[image] = False
    text = torch.nonzero(mask).view(-1).tolist()
    rows = [cap[s][0, :, -1].float().mean(0) for s in sites]
    image_mass, text_mass = np.full(n, np.nan), np.full(n, np.nan)
    image_mass[layers] = [float(r[image].sum()) if lm else np.nan for r in rows]
    text_mass[layers] = [float(r[text].sum()) for r in rows]
    return image_mass, text_mass


def explain_hallucination(
    vlm: VLM,
    image: Image.Image,
    phrase: str,
    prompt: str = DESCRIBE_PROMPT,
    decoder: str = "greedy",
    method: str = "chefer_relevance",
    max_new_tokens: int = 24,
) -> HallucinationExplanation:
    """Decode ``prompt`` about ``image`` and explain the first occurrence of ``phrase`` (for
    example a hallucinated ``"blue square"``) at the token of its last word.

    Raises:
        InputError: the phrase is not in what the decoder produced.
    """
    inputs = vlm.prepare(image, prompt)
    ids = make_decoder(decoder).decode(vlm, inputs.to(vlm.device), max_new_tokens)[0].cpu()
    special = set(vlm.tokenizer.all_special_ids)
    ids = ids[[int(i) not in special for i in ids]]
    tokens = vlm.tokenizer.convert_ids_to_tokens(ids.tolist())
    caption = vlm.tokenizer.decode(ids, skip_special_tokens=True).strip()
    k = _find([str(t) for t in tokens], phrase.lower().split())
    if k < 0:
        raise InputError(f"{phrase!r} is not in the {decoder} decoding: {caption!r}")
    forced = inputs.extend(ids[:k].view(1, -1)) if k else inputs
    target = TokenId(int(ids[k]))
    relevance = make_method(method)(vlm, forced, target)
    lens = LogitLens(k=5)(vlm, forced, target)
    image_mass, text_mass = _attention(vlm, forced)
    return HallucinationExplanation(caption, phrase, k, relevance, lens, image_mass, text_mass)
