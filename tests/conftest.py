import os
from pathlib import Path

import pytest
import torch

SHARED_OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def pytest_addoption(parser):
    parser.addoption(
        "--device", default="all",
        help="where the tests that take the `device` fixture run: 'all' (the default: cpu, and "
             "cuda where torch sees one), or one device ('cpu', 'cuda', 'cuda:1'). "
             "`pytest -m device --device cuda` runs the same assertions on the GPU only "
             "(python -m benchmarks.device_check does).")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: takes the `device` fixture (see --device); "
                                       "added to such tests automatically")
    devices_to_test(config)  # a CUDA run asked for where there is none: one error before any test


def devices_to_test(config) -> list:
    choice = config.getoption("--device")
    if choice == "all":
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if torch.device(choice).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {choice}: torch {torch.__version__} sees no CUDA "
                                f"device here (torch.cuda.is_available() is False)")
    return [choice]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", devices_to_test(metafunc.config), indirect=True)


@pytest.fixture
def device(request) -> str:
    """The device a test runs on, once per device of --device. The test builds its network and
    data as on the CPU (the same seeds and CPU generators) and moves them with .to(device).
    On CUDA, TensorFloat-32 is off for the test: its convolutions and matrix products would
    otherwise keep 10 bits of mantissa, and the tolerances are float32's."""
    name = request.param
    if torch.device(name).type != "cuda":
        yield name
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield name
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


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
