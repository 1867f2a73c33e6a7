"""The preprocessing cache tells a damaged file from a programming error."""
import pytest
import torch

from imaml_lightning.data import cache


def test_a_damaged_cache_file_is_rebuilt(tmp_path):
    (tmp_path / "set-key.pt").write_bytes(b"truncated")
    loaded = cache.cached(tmp_path, "set", "key", lambda: {"x": torch.arange(3)})
    assert torch.equal(loaded["x"], torch.arange(3))


def test_an_error_that_is_no_damage_surfaces(tmp_path, monkeypatch):
    """Out of memory, or a bug, while reading the cache is raised, not taken for a damaged file
    (which would rebuild it, then fail again or hide the cause)."""
    cache.cached(tmp_path, "set", "key", lambda: {"x": torch.arange(3)})
    for error in (MemoryError(), TypeError("a bug")):
        def failing_load(*args, **kwargs):
            raise error
        monkeypatch.setattr(cache.torch, "load", failing_load)
        with pytest.raises(type(error)):
            cache.cached(tmp_path, "set", "key", lambda: pytest.fail("rebuilt"))
