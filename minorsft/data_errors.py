"""The error every bad input row raises: its own module, so that each module that reads a part
of a row (`minorsft.row_reading`, `minorsft.conversations`, `minorsft.tools`) can raise it."""


class DataError(ValueError):
    """Bad input: the message names the file, the line (or row) and the field."""

    def __init__(self, path: str, line: int | None, field_name: str | None, reason: str):
        self.path, self.line, self.field, self.reason = path, line, field_name, reason
        where = path if line is None else f"{path}:{line}"
        what = f" field {field_name!r}:" if field_name else ""
        super().__init__(f"{where}:{what} {reason}")

    def __reduce__(self):  # (rows are checked in other processes: minorsft.row_workers)
        return type(self), (self.path, self.line, self.field, self.reason)


def type_name(value) -> str:
    """A row value's type for messages: Python's names, but `null` for JSON's null (a `null`
    line read "expected a JSON object, got NoneType")."""
    return "null" if value is None else type(value).__name__
