"""Errors a user can cause, and the value checks that configs (recipes, models) raise them with."""


class UserError(Exception):
    """A problem the user can fix (bad path, bad recipe, offline download...).

    The CLI prints it as one line and exits non-zero; `--debug` shows the traceback.
    """


class RecipeError(ValueError):
    """Raised by a config's __post_init__: `key` is the offending field."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise RecipeError(key, message)


def check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    check(value in choices, key, f"one of {', '.join(repr(c) for c in choices)}, got {value!r}")
