"""Role tables shared by the adapters: a family that reuses a layout needs one call, not a copy.

Each function maps the fixed role names of one part of a model (a layer stack, a decoder
language model, a CLIP-style or SigLIP vision tower) to module paths under a prefix, and gives
the layer list its stack indexes. An adapter's ``ROLES`` is these tables merged with the few
paths that are its own (``projector``, extra roles).
"""

from __future__ import annotations

Roles = dict[str, str]

#: Attribute names in a Llama-style decoder layer (``self_attn.o_proj``, ``mlp.act_fn``).
LLAMA_LAYER = {"attn": "self_attn", "heads": "self_attn.o_proj", "act": "mlp.act_fn"}
#: Attribute names in a CLIP-style encoder layer (``self_attn.out_proj``, ``mlp.activation_fn``).
CLIP_LAYER = {"attn": "self_attn", "heads": "self_attn.out_proj", "act": "mlp.activation_fn"}


def stack_roles(stack: str, layers: str, names: dict[str, str] = LLAMA_LAYER) -> Roles:
    """The roles of one layer of ``stack`` at ``layers.{i}``: the block, its attention, the
    heads (the input of the attention's output projection), its MLP and the MLP activation."""
    layer = layers + ".{i}"
    return {
        stack: layer,
        f"{stack}.attn": f"{layer}.{names['attn']}",
        f"{stack}.attn.heads": f"{layer}.{names['heads']}",
        f"{stack}.mlp": f"{layer}.mlp",
        f"{stack}.mlp.act": f"{layer}.{names['act']}",
    }


def decoder_lm_roles(model: str = "model.language_model", head: str = "lm_head") -> Roles:
    """A Llama-style decoder language model at ``model`` (``embed_tokens``, ``layers``,
    ``norm``) and its output head: the ``lm.*`` roles and ``lm_head``."""
    return {
        "lm.embed": f"{model}.embed_tokens",
        **stack_roles("lm.layer", f"{model}.layers"),
        "lm.norm": f"{model}.norm",
        "lm_head": head,
    }


def vision_tower_roles(tower: str, layers: str = "encoder.layers", norm: str = "") -> Roles:
    """A CLIP-style (or SigLIP) vision tower at ``tower``: embeddings, its encoder layers and,
    when given, the norm after them (``vision.norm``)."""
    roles = {
        "vision.embed": f"{tower}.embeddings",
        **stack_roles("vision.layer", f"{tower}.{layers}", CLIP_LAYER),
    }
    if norm:
        roles["vision.norm"] = f"{tower}.{norm}"
    return roles


def layer_lists(roles: Roles) -> dict[str, str]:
    """The layer list of every stack in ``roles`` (a role whose path ends in ``.{i}``)."""
    return {
        role: path.removesuffix(".{i}") for role, path in roles.items() if path.endswith(".{i}")
    }
