"""User-facing errors: the CLI prints them as one line and exits with code 2 (no traceback)."""

from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix; the message names the problem and the fix."""


class ConfigError(UserError, ValueError):
    """An unknown key, a wrong type or an impossible value in a config or a ``key=value`` override."""


class ModelNotFoundError(UserError, FileNotFoundError):
    """Weights that are neither registered, nor a local folder, nor in the Hugging Face cache."""
