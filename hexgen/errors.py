"""Errors caused by the user's input; the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
    """Something the user supplied is wrong; the message says what and what would be right."""


class ConfigError(UserError):
    """A model config or model path that hexgen cannot use."""


class PlanError(UserError):
    """A deployment plan or a --tp/--layers layout that breaks a rule."""
