import subprocess
import sys

import pytest

from imaml_lightning.allocator import keep_freed_memory

CHECK = "from imaml_lightning.allocator import keep_freed_memory; print(keep_freed_memory())"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_allocator_tuning_applies_unless_switched_off():
    def run(env):
        return subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                              env=env, check=True).stdout.strip()
    assert run({}) == "True"
    assert run({"IMAML_SYSTEM_MALLOC": "1"}) == "False"


def test_allocator_tuning_is_safe_to_repeat():
    assert keep_freed_memory() == keep_freed_memory()
