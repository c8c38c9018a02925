"""Self-contained HTML pages (images inlined), rendered with jinja2."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from PIL import Image

_ENV = Environment(
    loader=PackageLoader("mmscope.report", "templates"), autoescape=select_autoescape()
)


def data_uri(image: Image.Image, scale: int = 1) -> str:
    """A PNG data URI of ``image``, optionally enlarged by nearest-neighbour ``scale``."""
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_page(path: Path, template: str, **context: Any) -> Path:
    """Render ``templates/<template>`` with ``context`` into ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(_ENV.get_template(template).render(**context), encoding="utf-8")
    return path
