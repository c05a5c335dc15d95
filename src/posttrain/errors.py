"""User-facing errors. Each carries a one-line message naming what is wrong and where.

The CLI catches `PosttrainError` and prints `error: <message>` without a traceback.
"""


class PosttrainError(Exception):
    """Base class for errors whose message is meant for the user as-is."""


class ConfigError(PosttrainError, ValueError):
    """A config key, value or combination is invalid."""


class DataError(PosttrainError, ValueError):
    """A dataset file or row is malformed (message names file and row)."""


class ModelError(PosttrainError, ValueError):
    """A model path, preset or architecture cannot be used as asked."""


class RewardError(PosttrainError, RuntimeError):
    """Reward functions failed past the configured error budget."""


class TrainingError(PosttrainError, RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""
