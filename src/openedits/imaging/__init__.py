"""Image handling: safe fetching, decoding with limits, masks and grids."""

from openedits.imaging.decode import DecodedImage, decode_image
from openedits.imaging.fetch import Fetcher
from openedits.imaging.grid import make_grid
from openedits.imaging.mask import composite, decode_mask

__all__ = ["DecodedImage", "Fetcher", "composite", "decode_image", "decode_mask", "make_grid"]
