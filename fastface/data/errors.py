"""The one exception of bad input data: it names the file, and the record when there is one."""
from __future__ import annotations


class DataError(ValueError):
    """Unreadable or inconsistent input data: ``path``, optional ``record`` (key or name), ``reason``."""

    def __init__(self, path: str, reason: str, record: int | str | None = None, offset: int | None = None):
        self.path, self.reason, self.record, self.offset = path, reason, record, offset
        where = "" if record is None else (f" record {record}" if isinstance(record, int) else f" {record}")
        at = "" if offset is None else f" (offset {offset})"
        super().__init__(f"{path}{where}{at}: {reason}")

    def __reduce__(self):  # keeps the fields across worker processes
        return (type(self), (self.path, self.reason, self.record, self.offset))
