"""The README: its settings table states the Omniglot config's values; its solver example runs."""
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


def test_the_solver_example_runs():
    """The README's "Using the solver without Lightning" code, with the tasks and optimizer it
    assumes the reader has."""
    import torch

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using the solver without Lightning"):]
    start = section.index("```python\n") + len("```python\n")
    code = section[start:section.index("\n```", start)]
    images = lambda n: torch.rand(2, n, 1, 28, 28)  # noqa: E731
    labels = torch.arange(5).expand(2, 5)
    namespace = {"support_x": images(5), "support_y": labels, "query_x": images(5), "query_y": labels}
    namespace["optimizer"] = _DeferredAdam()
    exec(code, namespace)
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in namespace["net"].parameters())
    assert namespace["optimizer"].stepped


class _DeferredAdam:
    """The example's `optimizer`: it is made before the network in a real script."""
    stepped = False

    def step(self):
        self.stepped = True
