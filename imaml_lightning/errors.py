"""The one exception type the command line turns into a short message instead of a traceback."""
import re


class SettingError(ValueError):
    """A user-facing setting (or the data it points to) is invalid: the message names the
    setting, the value given and what is allowed."""


def require(condition: bool, setting: str, value, allowed: str) -> None:
    if not condition:
        raise SettingError(f"{setting}={value!r} is invalid: {allowed}")


def find_setting_error(error: BaseException) -> "SettingError | None":
    """The SettingError behind `error`: itself, a cause, or one that jsonargparse folded into
    the text of its own ValueError while trying the subclasses of a setting."""
    seen = error
    while seen is not None:
        if isinstance(seen, SettingError):
            return seen
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"^\s*- (\S.* is invalid: .*)$", str(error), re.MULTILINE)
    return SettingError(match.group(1)) if match else None
