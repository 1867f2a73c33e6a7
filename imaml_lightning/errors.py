"""The one exception type the command line turns into a short message instead of a traceback."""
import os
import re


class SettingError(ValueError):
    """A user-facing setting (or the data it points to) is invalid: the message names the
    setting, the value given and what is allowed."""


def require(condition: bool, setting: str, value, allowed: str) -> None:
    if not condition:
        raise SettingError(f"{setting}={value!r} is invalid: {allowed}")


def display_path(path) -> str:
    """A path as a message shows it: relative to the working folder when inside it."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


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


def summarize_parse_error(message: str) -> str:
    """jsonargparse's nested report of a value it could not parse, as one line in our form:
    'data.split='drawers' is invalid: must be one of 'paper', 'alphabet''."""
    keys = list(dict.fromkeys(re.findall(r'Parser key "([^"]+)"', message)))
    expected = re.search(r"Expected (?:a |an )?(.+?)\. Got value: (.*)", message)
    if not keys or not expected:
        return " ".join(line.strip() for line in message.strip().splitlines())
    allowed, value = expected.groups()
    literal = re.fullmatch(r"typing\.Literal\[(.*)\]", allowed)
    allowed = re.sub(r"<class '([\w.]+)'>", r"\1", allowed)
    allowed = f"must be one of {literal.group(1)}" if literal else f"must be {allowed}"
    return f"{'.'.join(keys)}={value.strip()!r} is invalid: {allowed}"
