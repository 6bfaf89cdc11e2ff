"""lemis's error types: one sentence naming the path or option, printed by the CLI without a traceback."""


class LemisError(Exception):
    """Bad input a user can fix: the message names the path or option and what was expected."""


class DataError(LemisError):
    """A data root, list file or h5 file is missing, unreadable, or holds unexpected content."""


class PrepareError(LemisError):
    """Bad input for a conversion of an official release into a layout (``python -m datamodules.prepare``)."""


class ConfigError(LemisError):
    """An option has an impossible value (budget, batch split, schedule, method needs)."""
