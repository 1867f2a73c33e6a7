"""benchmarks.device_check's quick form (what a machine without CUDA runs), once for the module,
and the precision rules its rows show: bf16-mixed trains within a measured distance of float32,
16-mixed and the 16-bit "-true" precisions stop with one line."""
import re
import subprocess
import sys

import pytest
import torch

from imaml_lightning.cli import main
from tests.helpers import REPO, cli_env

ROWS = ("machine", "device tests", "5-way 1-shot fit", "precision 32-true", "precision bf16-mixed",
        "precision 16-mixed", "DDP", "peer_speed", "compile_solver")
# The bf16-mixed meta-gradient's relative distance to float32's at the same parameters, on the
# quick form's tiny Omniglot config (8 channels, 2 inner and 2 CG steps, meta-batch 4, seed 0):
# measured 0.46, 0.33 and 0.28 at its 3 steps (2026-12-06, 2-core x86 CPU, torch 2.14.1). bfloat16
# keeps 8 bits of mantissa, and BatchNorm's backward subtracts nearly equal terms. For scale:
# two meta-batches' float32 meta-gradients differ by 1.3-1.6 (cosine about 0) on the same
# network. The bound leaves room for other CPUs' bfloat16 kernels; above it, or at 0 (nothing
# ran in bfloat16), the test fails.
BF16_BOUND = 0.6


@pytest.fixture(scope="module")
def quick_form(tmp_path_factory, omniglot_root, cache_dir) -> dict:
    """{check: (where, result, detail)} of `python -m benchmarks.device_check --quick`."""
    folder = tmp_path_factory.mktemp("device_check")
    out = folder / "device_check.md"
    run = subprocess.run([sys.executable, "-m", "benchmarks.device_check", "--quick", "--out",
                          str(out), "--omniglot-root", str(omniglot_root),
                          "--cache-dir", str(cache_dir)],
                         cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = out.read_text().strip().splitlines()
    assert lines[:2] == ["| check | where | result | detail |", "|---|---|---|---|"]
    assert out.read_text().strip() in run.stdout  # printed too
    rows = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines[2:]]
    return {check: tuple(cells) for check, *cells in rows}


@pytest.mark.slow
def test_the_quick_form_fills_every_row(quick_form):
    assert tuple(quick_form) == ROWS
    where, result, detail = quick_form["machine"]
    assert where == ("no GPU" if not torch.cuda.is_available() else where)
    assert f"torch {torch.__version__}" in result
    assert quick_form["device tests"][1] == "passed"
    assert re.search(r"\d+ passed", quick_form["device tests"][2])
    assert "meta-steps/s" in quick_form["5-way 1-shot fit"][1]
    assert quick_form["precision 32-true"][1] == "runs"
    assert quick_form["compile_solver"][:2] == ("no GPU", "no GPU")  # GPU-only
    where, result, detail = quick_form["peer_speed"]  # on the CPU at --quick's sizes
    assert "no GPU" in where and result.startswith("ours ") and "authors' code" in detail


@pytest.mark.slow
def test_ddp_row_trains_like_one_process(quick_form):
    where, result, detail = quick_form["DDP"]
    assert where.startswith("2 CPU processes") and result == "same as 1 device", detail
    distance = float(re.search(r"relative distance max (\S+) over", detail).group(1))
    assert distance <= 1e-6
    assert "episodes the same" in detail


@pytest.mark.slow
def test_bf16_mixed_trains_within_the_measured_distance_of_float32(quick_form):
    where, result, detail = quick_form["precision bf16-mixed"]
    assert result == "runs", detail
    distance = float(re.search(r"relative distance max (\S+),", detail).group(1))
    assert 1e-3 < distance <= BF16_BOUND


@pytest.mark.slow
def test_16_mixed_stops_with_one_line_naming_bf16_mixed(quick_form):
    where, result, detail = quick_form["precision 16-mixed"]
    assert result == "stops"
    assert detail.startswith("error: trainer.precision='16-mixed' is invalid: must be one of "
                             "('32-true', 'bf16-mixed', '64-true')")
    assert detail.endswith("use bf16-mixed")


SINUSOID = ["fit", "--config", "configs/sinusoid.yaml", "--trainer.max_steps", "1",
            "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]


@pytest.mark.parametrize("precision", ["16-mixed", "16-true", "bf16-true"])
def test_16_bit_precisions_are_one_error_naming_bf16_mixed(workdir, precision):
    """16-mixed reaches the program as such only on a GPU: on a CPU Lightning turns the flag into
    bf16-mixed itself. Its plugin, given explicitly, gets here as a GPU's 16-mixed does."""
    flag = (['--trainer.plugins+={"class_path": "pytorch_lightning.plugins.precision.'
             'MixedPrecision", "init_args": {"precision": "16-mixed", "device": "cpu"}}']
            if precision == "16-mixed" else ["--trainer.precision", precision])
    with pytest.raises(SystemExit) as exit_info:  # a message, not a traceback
        main([*SINUSOID, *flag])
    message = str(exit_info.value.code)
    assert message == (f"error: trainer.precision='{precision}' is invalid: must be one of "
                       f"('32-true', 'bf16-mixed', '64-true'): float16's loss scaling does not "
                       f"reach the gradients the solver takes inside a meta-step; use bf16-mixed")
