"""The one exception type the command line turns into a short message instead of a traceback."""


class SettingError(ValueError):
    """A user-facing setting (or the data it points to) is invalid: the message names the
    setting, the value given and what is allowed."""


def require(condition: bool, setting: str, value, allowed: str) -> None:
    if not condition:
        raise SettingError(f"{setting}={value!r} is invalid: {allowed}")
