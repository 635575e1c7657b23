"""User-facing errors: each one becomes a single line and exit code 2 at the CLI."""

from __future__ import annotations


class QPrunerError(Exception):
    """A problem with the user's input or environment that the user can fix."""


class ConfigError(QPrunerError):
    """A config field is wrong: names the field path and what is allowed."""

    def __init__(self, field: str, reason: str):
        self.field = field
        self.reason = reason
        super().__init__(f"{field}: {reason}")

    def __reduce__(self):
        # Rebuild from (field, reason): errors raised inside Ray tasks must reach the driver intact,
        # or Ray replaces them with an UnserializableException and the user sees a traceback.
        return (type(self), (self.field, self.reason))
