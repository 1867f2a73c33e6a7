"""The README's settings table states the shipped Omniglot config's values."""
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"model": ("model",), "data": ("data", "init_args"), "trainer": ("trainer",)}


def table_defaults() -> dict:
    """{'model.solver.inner_lr': '0.3', ...} from the rows of the table headed 'default (Omniglot config)'."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| default (Omniglot config) |"):].split("\n\n")[0]
    defaults = {}
    for row in table.splitlines()[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        flags = re.findall(r"`--([\w.]+)`", cells[0])
        values = [v.strip(" `") for v in cells[-1].split(",")]
        if len(flags) == len(values):
            defaults.update(zip(flags, values))
    return defaults


def config_value(config: dict, flag: str):
    section, _, key = flag.partition(".")
    node = config
    for part in SECTIONS.get(section, (section,)) + tuple(key.split(".")):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def same(written: str, value) -> bool:
    try:
        return float(written) == float(value)
    except (TypeError, ValueError):
        return written == str(value)


def test_the_settings_table_matches_the_omniglot_config():
    config = yaml.safe_load((REPO / "configs/omniglot_5way_1shot.yaml").read_text())
    defaults = table_defaults()
    checked = {flag: (written, config_value(config, flag)) for flag, written in defaults.items()
               if config_value(config, flag) is not None}
    assert len(checked) >= 10, checked  # the table is still parsed
    wrong = {flag: pair for flag, pair in checked.items() if not same(*pair)}
    assert not wrong, f"README says / config has: {wrong}"
