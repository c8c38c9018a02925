"""Studies: analyses over a whole dataset rather than one input (the survey's neuron and
embedding levels: neuron statistics, DAPE, MINER, dissection, probes, TCAV, SpLiCE, TextSpan,
anisotropy, sparse autoencoders).

Like every method, a study takes its settings in ``__init__`` and its data in
``__call__(vlm, items)``, where ``items`` are ``BenchItem`` s (``bench.world_items``, or a
user's folder and JSONL through ``bench.load_items``); it leaves the model as it found it and
returns a frozen result with ``to_dict``, ``plot`` and ``save`` (``methods.analysis.Result``).
Studies whose output is a table also write it as Parquet (``write_table``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import REGISTRY
from mmscope.models.capabilities import checks_needs

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

KIND = "study"


class Study:
    """Base of studies: settings in ``__init__``, data in ``__call__``; nothing cached on
    ``self``; the model is left as it was found."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:  # what the entry needs is checked before any work
            cls.__call__ = checks_needs(cls.__dict__["__call__"], KIND)  # type: ignore[method-assign]

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> Any:
        raise NotImplementedError


def studies() -> list[str]:
    """Keys of every registered study, sorted."""
    import mmscope.methods  # noqa: F401  (registers them)

    return sorted(REGISTRY.keys(KIND))


def study(key: str, vlm: VLM, items: Sequence[BenchItem], **kwargs: Any) -> Any:
    """Run the registered study ``key`` on ``items``; ``kwargs`` split into the call's own
    keywords and the study's settings (unknown settings raise ``InputError``)."""
    import mmscope.methods  # noqa: F401  (registers them)

    call = inspect.signature(REGISTRY.get(key, KIND).obj.__call__).parameters
    data = {k: v for k, v in kwargs.items() if k in call}
    settings = {k: v for k, v in kwargs.items() if k not in call}
    if not items:
        raise InputError(f"study {key} needs at least one item")
    return REGISTRY.make(key, KIND, **settings)(vlm, items, **data)


def write_table(columns: Mapping[str, Any], path: str | Path) -> Path:
    """Write equal-length columns (arrays or lists) as one Parquet table (pyarrow)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    lengths = {name: len(values) for name, values in columns.items()}
    if len(set(lengths.values())) > 1:
        raise InputError(f"table columns differ in length: {lengths}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table(
        {k: np.asarray(v) if not isinstance(v, list) else v for k, v in columns.items()}
    )
    pq.write_table(table, path)
    return path


def read_table(path: str | Path) -> dict[str, np.ndarray]:
    """A Parquet table written by ``write_table``, as columns of numpy arrays."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(path))
    return {name: table.column(name).to_numpy() for name in table.column_names}
