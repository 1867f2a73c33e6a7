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
