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


def ray_get(refs, **kwargs):
    """`ray.get` that re-raises a QPrunerError raised inside a Ray task or actor as itself, so the user
    sees the same one line as in the driver instead of a Ray traceback."""
    import ray
    from ray.exceptions import RayTaskError

    try:
        return ray.get(refs, **kwargs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, QPrunerError):
            raise cause from None
        raise
