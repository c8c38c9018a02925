"""Typed errors. Every failure a user can cause is one of these, never a deep torch traceback.

The CLI prints ``str(error)`` on one line and exits with status 2.
"""

from __future__ import annotations


class MMScopeError(Exception):
    """Base class of every error mmscope raises on purpose."""


class InputError(MMScopeError, ValueError):
    """Bad user input: an empty prompt, a wrong argument, an unknown setting."""


class ImageError(InputError):
    """An image that cannot be used: missing, corrupt, truncated, not an image."""


class ImageTooLargeError(ImageError):
    """An image over the pixel limit (decompression-bomb guard); pass ``allow_large=True``."""


class UnknownModelError(MMScopeError, LookupError):
    """A model name that is neither a known toy, a local folder, nor a reachable hub id."""


class UnsupportedArchitectureError(MMScopeError):
    """A Hugging Face model class for which no adapter is registered."""


class NotApplicableError(MMScopeError):
    """A method or metric that does not apply to this model or input."""


class WeightsError(MMScopeError):
    """Missing, corrupt or unsafe (non-safetensors) weights."""


class ChatTemplateError(MMScopeError):
    """A model's chat template that the sandbox refuses or that does not render."""


class OfflineError(MMScopeError):
    """A hub download was needed but there is no network (or offline mode is on)."""


class RegistryError(MMScopeError, KeyError):
    """A duplicate or unknown registry key."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0]) if self.args else ""


class SiteError(MMScopeError, LookupError):
    """A hook site that does not resolve on this model (unknown role, index out of range)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""
