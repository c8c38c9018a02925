"""The typed errors mmscope raises (``mmscope.errors.InputError``, ...)."""

from mmscope.core.errors import (
    ChatTemplateError,
    ImageError,
    ImageTooLargeError,
    InputError,
    MMScopeError,
    NotApplicableError,
    OfflineError,
    RegistryError,
    SiteError,
    UnknownModelError,
    UnsupportedArchitectureError,
    WeightsError,
)

__all__ = [
    "ChatTemplateError",
    "ImageError",
    "ImageTooLargeError",
    "InputError",
    "MMScopeError",
    "NotApplicableError",
    "OfflineError",
    "RegistryError",
    "SiteError",
    "UnknownModelError",
    "UnsupportedArchitectureError",
    "WeightsError",
]
