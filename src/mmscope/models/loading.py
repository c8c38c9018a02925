"""``mmscope.load``: toy names, local folders and hub ids, safetensors only.

Every way a model folder can be wrong is refused with one clear line before the model runs:
a config that is not JSON, names a model type transformers does not know, or asks for the
folder's own code (``auto_map``: no code from a model folder ever runs); pickle-only weights
(pickles are never read, even next to safetensors); weights that miss some of the model's
tensors or hold others (which would leave random weights); a chat template the sandbox
refuses. A hub id fails fast without a network: offline mode is checked first, and the one
probe of the hub is made without retries.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors import SafetensorError

from mmscope.core.errors import (
    UnknownModelError,
    UnsupportedArchitectureError,
    WeightsError,
)
from mmscope.core.registry import REGISTRY
from mmscope.models.base import VLM
from mmscope.models.hub import first_line, hub_config, render_chat

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
    """Silence transformers' fallback notices and the hub's retry warnings while loading."""
    loggers = [logging.getLogger(name) for name in ("transformers", "huggingface_hub")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _read_config(path: Path, where: str) -> dict[str, Any]:
    """``config.json`` as a dict; unreadable, binary or non-JSON files raise one line."""
    if not path.is_file():
        raise WeightsError(f"{where} has no config.json")
    try:
        config = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as err:
        raise WeightsError(f"cannot read the config of {where}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise WeightsError(f"the config.json of {where} is not valid JSON") from None
    if not isinstance(config, dict):
        raise WeightsError(f"the config.json of {where} is not a JSON object")
    return config


def _check_config(config: dict[str, Any], where: str, trust_remote_code: bool) -> str:
    """The architecture class the config names, refused where mmscope cannot load it."""
    model_type, remote = config.get("model_type"), config.get("auto_map")
    supported = ", ".join(sorted(supported_classes()))
    if not isinstance(model_type, str) or not model_type:
        raise WeightsError(f"the config.json of {where} names no model_type")
    if model_type not in transformers.CONFIG_MAPPING and not trust_remote_code:
        needs = (
            "needs the folder's own code (auto_map), and mmscope runs no code from a model folder"
            if remote
            else f"is not known to transformers {transformers.__version__}"
        )
        raise UnsupportedArchitectureError(
            f"{where} has model type {model_type!r}, which {needs}; supported: {supported}"
        )
    if remote and not trust_remote_code:
        warnings.warn(
            f"{where} names its own code (auto_map); mmscope runs none of it and loads "
            f"transformers' own {model_type!r} classes",
            stacklevel=4,
        )
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise UnsupportedArchitectureError(
            f"config of model type {model_type!r} names no architecture class"
        )
    if archs[0] not in supported_classes():
        raise UnsupportedArchitectureError(f"no adapter for {archs[0]}; supported: {supported}")
    return archs[0]


def _check_local_weights(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise WeightsError(
            f"{folder} has only pickle weights (.bin/.pt); mmscope loads safetensors only, "
            "convert them first"
        )
    raise WeightsError(f"{folder} has no weights (*.safetensors)")


def _check_loaded(info: dict[str, Any], name: str) -> None:
    """Refuse weights that miss some of the model's tensors or hold tensors it lacks."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    shapes = info.get("mismatched_keys") or ()
    mismatched = sorted(str(m[0] if isinstance(m, tuple) else m) for m in shapes)
    problems = [
        f"{len(keys)} {what} (e.g. {', '.join(keys[:2])})"
        for keys, what in (
            (missing, "of the model's tensors missing from them"),
            (unexpected, "tensors in them that the model does not have"),
            (mismatched, "tensors of the wrong shape"),
        )
        if keys
    ]
    if problems:
        raise WeightsError(
            f"the weights of {name} do not fit its architecture: {'; '.join(problems)}; "
            "refusing to run with random weights"
        )


def _check_template(processor: Any, name: str) -> None:
    """Render the chat template once, in transformers' sandbox, so a template it refuses
    fails here with one line rather than at the first prompt."""
    if not getattr(processor, "chat_template", None) or not hasattr(
        processor, "apply_chat_template"
    ):
        return
    content = [{"type": "image"}, {"type": "text", "text": "what is this ?"}]
    render_chat(processor, [{"role": "user", "content": content}], name)


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

    Raises:
        UnknownModelError, OfflineError, UnsupportedArchitectureError, WeightsError,
        ChatTemplateError: one line each (see the module docstring).
    """
    source: str | Path
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise UnknownModelError(f"a model is a name, a folder or a hub id, not {name_or_path!r}")
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
    local_only = False
    if isinstance(source, Path):
        config_file = source / "config.json"
    else:
        config_file, local_only = hub_config(source)
    arch = _check_config(_read_config(config_file, name), name, trust_remote_code)
    if isinstance(source, Path):
        _check_local_weights(source)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if local_only:
        kwargs["local_files_only"] = True
    model_cls = getattr(transformers, arch)
    model_kwargs = {**kwargs, "use_safetensors": True, "output_loading_info": True}
    if dtype is not None:
        model_kwargs["dtype"] = dtype
    if attn_implementation is not None:
        model_kwargs["attn_implementation"] = attn_implementation
    try:
        model, info = model_cls.from_pretrained(source, **model_kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as err:
        if "ignore_mismatched_sizes" in str(err):
            raise WeightsError(
                f"the weights of {name} do not fit its architecture: some tensors have the "
                "wrong shape for its config; refusing to run with random weights"
            ) from None
        raise WeightsError(f"cannot load the weights of {name}: {first_line(err)}") from None
    _check_loaded(info, name)
    adapter = supported_classes()[arch]
    try:
        processor = adapter.load_processor(source, trust_remote_code)
    except Exception as err:  # tokenizers raise bare Exceptions on a corrupt tokenizer.json
        raise WeightsError(f"cannot load the processor of {name}: {first_line(err)}") from None
    _check_template(processor, name)
    model.eval()
    if device is not None:
        model.to(device)
    return adapter(model, processor, name)
