"""Turn what a caller hands the SDK (a path, bytes, a PIL image, a URL) into an `image_url` string.

Local data goes up inline as a `data:image/<type>;base64,` URI with the type sniffed from the
bytes, so nothing needs to be hosted first. URLs pass through untouched: the server fetches them.
"""

from __future__ import annotations

import base64
import io
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

    ImageSource: TypeAlias = "str | os.PathLike[str] | bytes | bytearray | memoryview | PILImage"
else:
    ImageSource: TypeAlias = Any

__all__ = ["ImageSource", "sniff_mime", "to_image_url"]

_URL_PREFIXES = ("http://", "https://", "data:")


def sniff_mime(data: bytes) -> str | None:
    """The image MIME type the leading bytes announce, or None when they are no image we know."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"BM"):
        return "image/bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return "image/tiff"
    return None


def _data_uri(data: bytes, field: str, origin: str) -> str:
    mime = sniff_mime(data)
    if mime is None:
        raise ValueError(
            f"{field}: {origin} is not a PNG, JPEG, WebP, GIF, BMP or TIFF image "
            f"(first bytes {data[:8]!r}); pass an image file, its bytes, a PIL image or a URL"
        )
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _pil_to_png(image: PILImage) -> bytes:
    # PNG is lossless, so a mask's hard black/white edge arrives exactly as painted.
    buffer = io.BytesIO()
    if image.mode not in ("1", "L", "LA", "RGB", "RGBA", "P", "I", "I;16"):
        image = image.convert("RGBA")
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _is_pil_image(value: object) -> bool:
    # Checked without importing Pillow when the caller never uses it.
    module = type(value).__module__
    if not module.startswith("PIL."):
        return False
    from PIL import Image

    return isinstance(value, Image.Image)


def to_image_url(source: ImageSource, *, field: str = "image") -> str:
    """The `image_url` (or `mask`) string for `source`.

    - `str` starting with `http://`, `https://` or `data:`: sent as is.
    - any other `str` or `os.PathLike`: a local file, read and sent as a `data:` URI.
    - `bytes`: the encoded image file, sent as a `data:` URI.
    - a PIL image: encoded as PNG, sent as a `data:` URI.

    Raises `ValueError` for bytes that are no known image format and `FileNotFoundError` for a
    path that does not exist, each naming `field`.
    """
    if isinstance(source, str) and source.startswith(_URL_PREFIXES):
        return source
    if isinstance(source, str | os.PathLike):
        path = Path(source).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{field}: {str(source)!r} is neither an existing file nor an http(s) or data: URL"
            )
        return _data_uri(path.read_bytes(), field, f"the file {str(path)!r}")
    if isinstance(source, bytes | bytearray | memoryview):
        return _data_uri(bytes(source), field, "the bytes given")
    if _is_pil_image(source):
        return _data_uri(_pil_to_png(source), field, "the PIL image")
    raise TypeError(
        f"{field}: expected a path, a URL, bytes or a PIL image, got {type(source).__name__}"
    )
