"""Every benchmark runs in its CI-light form (--quick), and every study at least starts (--help).

Each runs as a user runs it, `python -m benchmarks.NAME` with its default data folders, from an
empty folder and with a cache of the session's own (XDG_CACHE_HOME), never the user's."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, cli_env

BENCHMARKS = sorted(p.stem for p in (REPO / "benchmarks").glob("*.py") if p.stem != "__init__")
STUDIES = sorted(p.stem for p in (REPO / "benchmarks/studies").glob("*.py") if p.stem != "__init__")
PEER = REPO.parent / "shared" / "peers" / "imaml_dev"


@pytest.fixture(scope="session")
def env(tmp_path_factory) -> dict:
    return {**cli_env(), "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg_cache"))}


@pytest.fixture
def run(env, tmp_path):
    """run(module, *args) -> its stdout, asserting it succeeded."""
    def run_module(module: str, *args) -> str:
        done = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-4000:]
        return done.stdout
    return run_module


@pytest.fixture(scope="session")
def peer_code() -> Path:
    """The authors' code beside this repository; skipped where absent, but required on CI."""
    if not (PEER / "implicit_maml" / "learner_model.py").is_file():
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but the authors' code is missing at {PEER}")
        pytest.skip(f"needs the authors' code at {PEER}")
    return PEER


def test_no_benchmark_imports_a_study():
    for name in BENCHMARKS:
        assert "benchmarks.studies" not in (REPO / "benchmarks" / f"{name}.py").read_text(), name


@pytest.mark.parametrize("study", STUDIES)
def test_study_starts(run, study):
    out = run(f"benchmarks.studies.{study}", "--help")
    # batch_norm_rule is compiled_gradient's experiment, a module without a command line
    assert ("usage: " in out) == (study != "batch_norm_rule"), out


def test_solver_speed(run):
    out = run("benchmarks.solver_speed", "--quick")
    assert "vectorized / floor" in out
    for curvature in ("hessian", "gauss_newton", "gauss_newton_fd"):
        assert f"| {curvature} |" in out


def test_solver_memory(run):
    out = run("benchmarks.solver_memory", "--quick")
    assert "| 1 | " in out and "plot: " in out


@pytest.mark.slow
def test_peer_speed(run, omniglot_root, peer_code):
    out = run("benchmarks.peer_speed", "--quick")
    assert "| authors' code | ours |" in out and "| ours, gauss_newton | theirs |" in out


@pytest.mark.slow
def test_peer_accuracy(run, omniglot_root, peer_code, tmp_path):
    """The two peers' arms (ours is table2's cell, tested with table2 below), run one at a time
    into one folder, as sessions share a long comparison: the second run reports both."""
    first = run("benchmarks.peer_accuracy", "--quick", "--arms", "learn2learn MAML", "--out", str(tmp_path))
    assert "| 5w1s | learn2learn MAML |" in first and "authors' iMAML" not in first
    out = run("benchmarks.peer_accuracy", "--quick", "--arms", "authors' iMAML", "--out", str(tmp_path))
    for arm in ("authors' iMAML", "learn2learn MAML"):
        assert f"| 5w1s | {arm} |" in out, out
    assert out.count("| transductive |") == 2 and "plot: " in out


def test_peer_accuracy_bad_input(env, tmp_path, omniglot_root):
    def run_module(*args):
        return subprocess.run([sys.executable, "-m", "benchmarks.peer_accuracy", "--quick", *args],
                              cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)

    missing_peer = run_module("--peer", str(tmp_path / "nowhere"), "--arms", "authors' iMAML")
    assert "skipped authors' iMAML: the authors' code is not at " in missing_peer.stdout
    assert missing_peer.returncode != 0 and "Traceback" not in missing_peer.stderr
    no_data = run_module("--omniglot-root", str(tmp_path / "nowhere"))
    assert no_data.returncode != 0 and "Traceback" not in no_data.stderr
    assert no_data.stderr.strip().splitlines()[-1].startswith("error: --omniglot-root=")


@pytest.mark.slow
def test_data_pipeline(run, omniglot_root):
    out = run("benchmarks.data_pipeline", "--quick")
    assert "| 5-way 1-shot, 5 queries |" in out and "| cifarfs |" in out
    assert "| Mini-ImageNet-shaped 5-way 1-shot, 15 queries |" in out


@pytest.mark.slow
def test_use_your_model(run, omniglot_root):
    out = run("benchmarks.use_your_model", "--quick")
    assert "predict: " in out and "| transductive |" in out and "| support |" in out


@pytest.mark.slow
def test_table2_seed_trains_the_steps_of_seed_0_without_a_time_limit_and_its_model_ships(run, omniglot_root, tmp_path):
    """table2 --quick (the repository's results left alone), then seed 1 of its cell with
    --steps-of, then ship_models --quick on the seed-0 cell."""
    results = REPO / "benchmarks" / "results" / "table2"
    before = {p: p.stat().st_mtime for p in results.rglob("*")}
    out = str(tmp_path / "table")
    assert "| 5w1s | imaml-gd |" in run("benchmarks.table2", "--quick", "--out", out)
    seed_0 = json.loads((tmp_path / "table" / "5w1s_imaml-gd" / "result.json").read_text())
    printed = run("benchmarks.table2", "--quick", "--seed", "1", "--steps-of", out, "--out", out)
    (fit,) = [line for line in printed.splitlines() if line.startswith("$") and " fit " in line]
    assert "--seed_everything 1" in fit and "--trainer.max_time" not in fit
    assert f"--trainer.max_steps {seed_0['meta_steps']} " in fit
    seed_1 = json.loads((tmp_path / "table" / "5w1s_imaml-gd_seed1" / "result.json").read_text())
    assert seed_1["meta_steps"] == seed_0["meta_steps"]
    assert "Over seeds:" in printed and "| 5w1s | imaml-gd | 2 |" in printed
    shipped = run("benchmarks.ship_models", "--quick", "--cells", out)  # the seed-0 cell's best
    # it adapts with, and tests to, the evaluation length that validated better
    longer = float(seed_0["val_longer"].split()[0]) > float(seed_0["val"].split()[0])
    steps = seed_0["longer_inner_steps"] // (1 if longer else 2)
    test = seed_0["test_longer" if longer else "test"]
    assert re.search(rf"\| 5w1s \| `python -m imaml_lightning fit --config configs/omniglot_5way_1shot.yaml "
                     rf"--data.root data/omniglot .*` \| {seed_0['best_step']} \| {steps} \| {re.escape(test)}% \|",
                     shipped), shipped
    assert {p: p.stat().st_mtime for p in results.rglob("*")} == before


def test_a_cell_is_reported_with_the_evaluation_length_that_validated_better():
    from benchmarks.table2 import validated_evaluation

    cell = {"test": "90.0 ± 0.5", "test_longer": "91.0 ± 0.4", "longer_inner_steps": 20}
    assert validated_evaluation({**cell, "val": "88.0 ± 1", "val_longer": "92.0 ± 1"}) == (20, "91.0 ± 0.4")
    assert validated_evaluation({**cell, "val": "92.0 ± 1", "val_longer": "92.0 ± 1"}) == (10, "90.0 ± 0.5")
    assert validated_evaluation({"test": "90.0 ± 0.5"}) == (None, "90.0 ± 0.5")


@pytest.mark.slow
def test_compiled_training(run, omniglot_root):
    out = run("benchmarks.compiled_training", "--quick")
    assert "| eager |" in out and "| compiled |" in out


STOPPED_FIT = """
import json, sys, torch
from pathlib import Path
from benchmarks import table2
cell = Path(sys.argv[1])
(cell / "checkpoints").mkdir(parents=True)
(cell / "plan.json").write_text(json.dumps({"minutes": None, "max_steps": 10, "val_check_interval": 5}))
def stopped_fit(*args, workdir):  # a fit that a signal stopped at meta-step 4 (exit status 0)
    torch.save({"global_step": 4, "callbacks": {}}, workdir / "checkpoints" / "last.ckpt")
    return [], 1.0
table2.cli = stopped_fit
table2.run_cell(cell, [], None, "omniglot_5way_1shot_paper.yaml")
"""


def test_table2_records_no_result_for_a_run_of_fixed_steps_stopped_early(env, tmp_path):
    """A cell of fixed meta-steps whose fit a signal ended (a session's end, preemption) must not
    be tested and recorded as finished: it resumes from its last.ckpt."""
    done = subprocess.run([sys.executable, "-c", STOPPED_FIT, str(tmp_path / "cell")], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == ("cell: stopped at meta-step 4 of 10; the same command continues "
                                   "it from its last.ckpt")
    assert not (tmp_path / "cell" / "result.json").exists()


def test_table2_steps_plans_exactly_those_meta_steps_and_keeps_the_plan(env, tmp_path):
    """--steps N: a plan of N meta-steps and no time limit, which a rerun with another N refuses
    in one line instead of training the cell to another plan."""
    from benchmarks.table2 import plan_fixed_steps

    plan_fixed_steps(tmp_path / "cell", 1600)
    planned = json.loads((tmp_path / "cell" / "plan.json").read_text())
    assert planned == {"minutes": None, "max_steps": 1600, "val_check_interval": 200}
    plan_fixed_steps(tmp_path / "cell", 1600)  # the same plan: kept
    with pytest.raises(SystemExit, match="planned for 1600 meta-steps, not --steps 1200"):
        plan_fixed_steps(tmp_path / "cell", 1200)
    for bad in (["--steps", "0"], ["--steps", "100", "--minutes", "5"]):
        done = subprocess.run([sys.executable, "-m", "benchmarks.table2", *bad], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and "Traceback" not in done.stderr and "--steps" in done.stderr, done.stderr
