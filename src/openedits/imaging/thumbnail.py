"""Small renditions of result files, for pages that list many results (the playground's recents)."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict

from PIL import Image

__all__ = ["THUMBNAIL_WIDTHS", "ThumbnailCache", "thumbnail_webp"]

THUMBNAIL_WIDTHS = (128, 256, 512, 1024)
"""The widths a rendition may have: a few fixed ones, so a cache of them stays small and a
client cannot make the server render one per pixel of width."""

# A 4096 px grid decodes to 50 MB of pixels: two renders at a time bound the memory and CPU
# that requests for renditions can take, however many arrive.
_RENDER_SLOTS = threading.BoundedSemaphore(2)


def thumbnail_webp(data: bytes, width: int) -> bytes:
    """`data` (an image file) scaled to at most `width` pixels wide, as WebP (alpha kept)."""
    with _RENDER_SLOTS, Image.open(io.BytesIO(data)) as source:
        source.load()
        im: Image.Image = source
        if im.width > width:
            height = max(1, round(im.height * width / im.width))
            im = im.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
        if im.mode not in ("RGB", "RGBA"):
            im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        out = io.BytesIO()
        im.save(out, format="WEBP", quality=80, method=4)
        return out.getvalue()


class ThumbnailCache:
    """Renditions by (key, width, version), least recently used dropped past `max_bytes`."""

    def __init__(self, max_bytes: int = 32_000_000) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[tuple[str, int, str], bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str, width: int, version: str) -> bytes | None:
        """The cached rendition, if any."""
        with self._lock:
            item = self._items.get((key, width, version))
            if item is not None:
                self._items.move_to_end((key, width, version))
            return item

    def put(self, key: str, width: int, version: str, data: bytes) -> None:
        """Keep a rendition, dropping the oldest past the budget."""
        with self._lock:
            old = self._items.pop((key, width, version), None)
            self._size -= len(old) if old else 0
            self._items[(key, width, version)] = data
            self._size += len(data)
            while self._size > self.max_bytes and len(self._items) > 1:
                _, dropped = self._items.popitem(last=False)
                self._size -= len(dropped)
