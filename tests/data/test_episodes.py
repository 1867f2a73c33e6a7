import torch
from torch.utils.data import DataLoader

from imaml_lightning.data.episodes import EpisodeStream, FixedEpisodes
from imaml_lightning.data.sinusoid import SinusoidTasks

SAMPLER = SinusoidTasks(3, 2, (0.1, 5.0), (0.0, 3.14), (-5.0, 5.0))


def take(loader, n):
    iterator = iter(loader)
    return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v)


def test_workers_yield_the_same_stream_as_the_main_process():
    stream = EpisodeStream(SAMPLER, seed=3, meta_batch_size=4)
    plain = take(DataLoader(stream, batch_size=None), 5)
    workers = take(DataLoader(stream, batch_size=None, num_workers=2), 5)
    assert_batches_equal(plain, workers)


def test_ranks_split_the_global_meta_batch_between_them():
    single = take(DataLoader(EpisodeStream(SAMPLER, seed=3, meta_batch_size=4), batch_size=None), 3)
    ranks = [take(DataLoader(EpisodeStream(SAMPLER, 3, 4, rank=r, world_size=2), batch_size=None), 3)
             for r in range(2)]
    for step in range(3):
        joined = [torch.cat([ranks[0][step][i], ranks[1][step][i]]) for i in range(4)]
        assert_batches_equal([single[step]], [joined])
    assert not torch.equal(ranks[0][0][0], ranks[1][0][0])  # distinct tasks on each rank


def test_stream_resumes_at_a_given_step_and_depends_on_the_seed():
    full = take(DataLoader(EpisodeStream(SAMPLER, 3, 4), batch_size=None), 4)
    resumed = take(DataLoader(EpisodeStream(SAMPLER, 3, 4, start_step=2), batch_size=None), 2)
    assert_batches_equal(full[2:], resumed)
    other_seed = take(DataLoader(EpisodeStream(SAMPLER, 4, 4), batch_size=None), 1)
    assert not torch.equal(full[0][0], other_seed[0][0])


def test_fixed_episodes_are_fixed_and_differ_between_splits():
    val = FixedEpisodes(SAMPLER, "val", 10, seed=0)
    assert len(val) == 10
    assert torch.equal(val[7][0], FixedEpisodes(SAMPLER, "val", 10, seed=0)[7][0])
    assert not torch.equal(val[7][0], val[8][0])
    assert not torch.equal(val[7][0], FixedEpisodes(SAMPLER, "test", 10, seed=0)[7][0])


def test_fixed_episodes_are_shared_out_across_ranks_without_repeats():
    whole = FixedEpisodes(SAMPLER, "val", 10, seed=0)
    shards = [FixedEpisodes(SAMPLER, "val", 10, seed=0, rank=r, world_size=3) for r in range(3)]
    assert [len(s) for s in shards] == [4, 3, 3]
    gathered = sorted((x for s in shards for x in s), key=lambda t: t[0].sum().item())
    expected = sorted(whole, key=lambda t: t[0].sum().item())
    assert all(torch.equal(a[0], b[0]) for a, b in zip(gathered, expected))
