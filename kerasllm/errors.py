"""Errors a user can act on. The CLI prints their message and exits non-zero."""


class KerasLLMError(Exception):
    """Base class: something the user can fix (a file, a config value, a plugin)."""


class ConfigError(KerasLLMError, ValueError):
    """A config key or value is invalid; the message names the key and what is allowed."""


class PluginError(KerasLLMError):
    """A plugin is missing, broken, ambiguous or returned something malformed."""
