"""Format codecs: the only code that turns weights into the bytes a checkpoint ships."""

from prismq.formats.base import Format, FormatError, Tensors
from prismq.formats.registry import FORMATS, format_names, get_format

__all__ = ["FORMATS", "Format", "FormatError", "Tensors", "format_names", "get_format"]
