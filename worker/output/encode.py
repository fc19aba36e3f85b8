"""Images to bytes. Pure. (Each format's extension and MIME type: ``producer.layout``.)"""

from __future__ import annotations

import io
from typing import Any

from producer.layout import CONTENT_TYPES


def encode_image(image: Any, fmt: str, *, webp_quality: int = 90, jpeg_quality: int = 95) -> bytes:
    """Encode a PIL image as png (lossless), webp or jpeg."""
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG", compress_level=6)
    elif fmt == "webp":
        image.save(buffer, format="WEBP", quality=webp_quality, method=4)
    elif fmt == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=jpeg_quality, optimize=True)
    else:
        raise ValueError(f"format must be one of {sorted(CONTENT_TYPES)}, got {fmt!r}")
    return buffer.getvalue()
