"""One entry point: the installed `imaml-lightning` script and `python -m imaml_lightning` reach
the same subcommands and give the same results, and an ordinary run prints no library noise."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(sys.executable).parent / "imaml-lightning"
SINUSOID = ["--config", "configs/sinusoid.yaml", "--data.init_args.val_episodes", "10",
            "--data.init_args.test_episodes", "10", "--trainer.val_check_interval", "2",
            "--trainer.enable_progress_bar", "false"]
ENTRY_POINTS = {"script": [str(SCRIPT)], "module": [sys.executable, "-m", "imaml_lightning"]}


def run(entry: str, workdir: Path, *args) -> subprocess.CompletedProcess:
    """As a user runs it: no PYTHONWARNINGS, so every warning that reaches a user shows."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    done = subprocess.run([*ENTRY_POINTS[entry], *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


def score_lines(output: str) -> list:
    return re.findall(r"(?:val|test)/mse = .* after \d+ meta-steps.*", output)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    if not SCRIPT.is_file():
        pytest.fail(f"the console script is not installed at {SCRIPT}: pip install -e .")
    work = tmp_path_factory.mktemp("entry")
    (work / "configs").mkdir()
    (work / "configs/sinusoid.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "configs/sinusoid.yaml").read_text())
    fit = run("script", work, "fit", *SINUSOID, "--trainer.max_steps", "2")
    assert len(score_lines(fit.stdout + fit.stderr)) == 1  # the validation after step 2
    return work


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_both_entry_points_evaluate_alike(trained, subcommand):
    args = [subcommand, *SINUSOID, "--ckpt_path", "checkpoints/last.ckpt"]
    script, module = (score_lines(run(e, trained, *args).stderr) for e in ENTRY_POINTS)
    assert script == module and len(script) == 1 and "after 2 meta-steps" in script[0]


@pytest.mark.slow
def test_both_entry_points_reach_report_and_predict(trained):
    for entry in ENTRY_POINTS:
        run(entry, trained, "report", "lightning_logs", "--out", entry)
        assert "sinusoid" in (trained / entry / "report.md").read_text()
        usage = run(entry, trained, "predict", "--help").stdout
        assert "--support" in usage and "--query" in usage  # predict's own parser, not Lightning's
    assert (trained / "script/report.md").read_text() == (trained / "module/report.md").read_text()


def test_an_ordinary_run_prints_no_library_warning_or_advertising(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs/sinusoid.yaml").write_text(
        (Path(__file__).resolve().parents[1] / "configs/sinusoid.yaml").read_text())
    for args in (["fit", *SINUSOID, "--trainer.max_steps", "2"],
                 ["test", *SINUSOID, "--ckpt_path", "checkpoints/last.ckpt"]):
        output = run("module", tmp_path, *args)
        printed = output.stdout + output.stderr
        assert not re.search(r"Warning|warn\(|Tip:", printed), printed[-3000:]
        assert score_lines(printed)  # the program's own lines are kept
