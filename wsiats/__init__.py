"""wsiats: whole-slide image classification with attention sampling."""

from __future__ import annotations

__version__ = "0.1.0"
