"""Hub ids without a network fail fast: offline mode (``HF_HUB_OFFLINE``) and the local cache
are checked first, then the hub is probed once without retries, so no run prints half a
minute of retry warnings before the right error."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from mmscope.core.errors import ChatTemplateError, OfflineError, UnknownModelError


def render_chat(processor: Any, messages: list[dict[str, Any]], name: str) -> str:
    """``processor.apply_chat_template`` (transformers' jinja2 sandbox) with its errors as one
    ``ChatTemplateError`` line: a template the sandbox forbids, or one that does not render."""
    import jinja2

    try:
        return str(
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    except jinja2.exceptions.SecurityError as err:
        raise ChatTemplateError(
            f"the chat template of {name} does something the sandbox forbids: {first_line(err)}"
        ) from None
    except jinja2.TemplateError as err:
        raise ChatTemplateError(
            f"the chat template of {name} does not render: {first_line(err)}"
        ) from None


def first_line(err: BaseException) -> str:
    """An exception's message cut to its first line (transformers' run to paragraphs)."""
    text = str(err).strip().splitlines()
    return text[0].strip() if text else type(err).__name__


def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return bool(constants.is_offline_mode()) or flag.strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_config(repo: str) -> tuple[Path, bool]:
    """(path of the hub model's config.json, whether to stay off the network): offline mode
    and the local cache are checked first, then the hub is probed once, without retries."""
    import huggingface_hub as hub
    from huggingface_hub import errors

    try:
        cached = hub.try_to_load_from_cache(repo, "config.json")
    except errors.HFValidationError as err:
        raise UnknownModelError(f"{repo!r} is not a hub id: {first_line(err)}") from None
    cached_path = Path(cached) if isinstance(cached, str) else None
    if _offline():
        if cached_path is None:
            raise OfflineError(
                f"{repo} is not in the local cache and offline mode is on (HF_HUB_OFFLINE), so "
                "nothing is downloaded from the hub: no network access"
            )
        return cached_path, True
    try:
        hub.get_hf_file_metadata(
            hub.hf_hub_url(repo, "config.json"), timeout=10, retry_on_errors=False
        )
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as err:
        raise UnknownModelError(f"cannot load {repo!r} from the hub: {first_line(err)}") from None
    except (errors.EntryNotFoundError, errors.RevisionNotFoundError):
        raise UnknownModelError(f"the hub repository {repo!r} has no config.json") from None
    except errors.HfHubHTTPError as err:
        raise UnknownModelError(f"the hub refused {repo!r}: {first_line(err)}") from None
    except Exception as err:  # no route to the hub: DNS, connection, timeout
        if cached_path is None:
            raise OfflineError(
                f"{repo} is not in the local cache and the hub cannot be reached to download "
                f"it ({type(err).__name__}: {first_line(err)})"
            ) from None
        warnings.warn(f"the hub cannot be reached; loading the cached copy of {repo}", stacklevel=4)
        return cached_path, True
    try:
        return Path(hub.hf_hub_download(repo, "config.json")), False
    except Exception as err:
        raise OfflineError(f"cannot download the config of {repo}: {first_line(err)}") from None
