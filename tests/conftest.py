import os
from pathlib import Path

import pytest

SHARED_OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


@pytest.fixture(scope="session")
def omniglot_root() -> Path:
    """The full Omniglot in ../shared; skipped where absent, but required on CI."""
    if not (SHARED_OMNIGLOT / "images_background").is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the shared Omniglot is missing at {SHARED_OMNIGLOT}")
        pytest.skip(f"needs the full Omniglot at {SHARED_OMNIGLOT}")
    return SHARED_OMNIGLOT


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One preprocessing cache for the whole session, never the user's own."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def workdir(tmp_path, monkeypatch, request) -> Path:
    """Run in an empty folder holding only the configs, as a user in a fresh checkout would."""
    configs = request.config.rootpath / "configs"
    (tmp_path / "configs").mkdir()
    for config in configs.glob("*.yaml"):
        (tmp_path / "configs" / config.name).write_text(config.read_text())
    monkeypatch.chdir(tmp_path)
    return tmp_path
