import subprocess
import sys

import pytest

# A 64 MiB tensor freed: does its memory go back to the OS (resident size drops)?
FREED_MEMORY_RETURNED = """
import os, torch
from imaml_lightning.allocator import keep_freed_memory
def resident(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
tuned = keep_freed_memory()
x = torch.ones(16 << 20)
before = resident()
del x
print(tuned, before - resident() > 32 << 20)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt is Linux-only")
def test_freed_memory_stays_in_the_process_unless_switched_off():
    def run(env):
        return subprocess.run([sys.executable, "-c", FREED_MEMORY_RETURNED], capture_output=True,
                              text=True, env=env, check=True).stdout.split()
    assert run({}) == ["True", "False"]  # kept: the next tensor of that size reuses it
    assert run({"IMAML_SYSTEM_MALLOC": "1"}) == ["False", "True"]  # glibc's default: unmapped
