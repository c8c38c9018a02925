"""``mmscope.load``: toy names, local folders and hub ids, safetensors only."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError

from mmscope.core.errors import (
    OfflineError,
    UnknownModelError,
    UnsupportedArchitectureError,
    WeightsError,
)
from mmscope.core.registry import REGISTRY
from mmscope.models.base import VLM

TOYS: dict[str, str] = {
    "toy-llava": "LLaVA-1.5-style model trained on the synthetic world",
    "toy-clip": "CLIP dual encoder trained on the synthetic world's captions",
}


def toy_path(name: str) -> Path:
    """Folder of a shipped toy model inside the package."""
    return Path(__file__).resolve().parent.parent / "toys" / "weights" / name


def supported_classes() -> dict[str, type[VLM]]:
    """HF class name -> adapter class, from the registry."""
    out: dict[str, type[VLM]] = {}
    for entry in REGISTRY.entries("adapter"):
        for cls in entry.extra.get("hf_classes", ()):
            out[cls] = entry.obj
    return out


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' fallback notices (no torchvision here) while loading."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _architecture(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    if not archs:
        raise UnsupportedArchitectureError(
            f"config of model type {config.model_type!r} names no architecture class"
        )
    return str(archs[0])


def _check_local_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise WeightsError(
            f"{folder} has only pickle weights (.bin/.pt); mmscope loads safetensors only, "
            "convert them first"
        )
    raise WeightsError(f"{folder} has no weights (*.safetensors)")


def load(
    name_or_path: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    *,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
) -> VLM:
    """Load a model and its processor and wrap them in their architecture's adapter.

    Args:
        name_or_path: ``toy-llava``, ``toy-clip``, a local folder, or a Hugging Face hub id.
        device: where to put the model (default CPU).
        dtype: parameter dtype (default: as saved).
        attn_implementation: ``"eager"`` to read attention probabilities, or ``"sdpa"``.
        trust_remote_code: run the repository's own code; off unless you ask.
    """
    source: str | Path
    if name_or_path in TOYS:
        source = toy_path(name_or_path)
        if not (source / "config.json").is_file():
            raise WeightsError(
                f"the weights of {name_or_path} are missing from the package; "
                f"rebuild them with `mmscope train-toy {name_or_path.removeprefix('toy-')}`"
            )
    elif Path(name_or_path).expanduser().is_dir():
        source = Path(name_or_path).expanduser()
    elif name_or_path.count("/") == 1 and not Path(name_or_path).suffix:
        source = name_or_path
    else:
        known = ", ".join(TOYS)
        raise UnknownModelError(
            f"unknown model {name_or_path!r}: not a known name ({known}), a local folder, "
            "or a hub id (owner/name)"
        )
    with _quiet_transformers():
        return _load_from(
            source, name_or_path, device, dtype, attn_implementation, trust_remote_code
        )


def _load_from(
    source: str | Path,
    name: str,
    device: str | torch.device | None,
    dtype: torch.dtype | None,
    attn_implementation: str | None,
    trust_remote_code: bool,
) -> VLM:
    try:
        config = transformers.AutoConfig.from_pretrained(
            source, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, json.JSONDecodeError) as err:
        if isinstance(source, Path):
            raise WeightsError(f"cannot read the config in {source}: {err}") from None
        message = str(err).lower()
        if "connect" in message or "offline" in message or "internet" in message:
            raise OfflineError(
                f"{name} is not in the local cache and there is no network to download it"
            ) from None
        raise UnknownModelError(f"cannot load {name!r} from the hub: {err}") from None
    arch = _architecture(config)
    adapters = supported_classes()
    if arch not in adapters:
        raise UnsupportedArchitectureError(
            f"no adapter for {arch}; supported: {', '.join(sorted(adapters))}"
        )
    if isinstance(source, Path):
        _check_local_weights(source)
    model_cls = getattr(transformers, arch)
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = model_cls.from_pretrained(source, **kwargs)
        processor = adapters[arch].load_processor(source, trust_remote_code)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise WeightsError(f"cannot load the weights of {name}: {err}") from None
    model.eval()
    if device is not None:
        model.to(device)
    return adapters[arch](model, processor, name)
