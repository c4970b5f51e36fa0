"""The one logging seam: library code reports progress through a `Log` callable it is
handed (print by default, a list's append in tests), never through a global logger."""
from __future__ import annotations

from collections.abc import Callable

Log = Callable[[str], None]
