"""End to end through the command line, as a user runs it."""
import json
import math
import re
import subprocess
import sys

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from imaml_lightning.cli import main
from tests.helpers import scalars, assert_compiled_trains_as_eager, load, tiny_omniglot

FAST_SINUSOID = [
    "--config", "configs/sinusoid.yaml",
    "--data.init_args.val_episodes", "20", "--data.init_args.test_episodes", "30",
    "--trainer.val_check_interval", "2", "--trainer.log_every_n_steps", "1",
    "--trainer.enable_progress_bar", "false",
]


def test_fit_writes_checkpoints_and_tensorboard_and_resumes(workdir):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "4"])
    last = workdir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 4
    assert list((workdir / "checkpoints").glob("best-step*.ckpt"))
    logged = scalars(workdir / "lightning_logs" / "version_0")
    for tag in ("train/query_loss_before", "train/query_loss_after", "train/inner_objective_after",
                "train/cg_residual", "train/meta_grad_norm", "val/mse", "val/mse_ci95"):
        assert tag in logged, tag
    assert [step for step, _ in logged["val/mse"]] == [1, 3]  # after steps 2 and 4

    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "6", "--ckpt_path", "last"])
    resumed = torch.load(last, weights_only=False)
    assert resumed["global_step"] == 6
    logged = scalars(workdir / "lightning_logs" / "version_1")
    assert [step for step, _ in logged["val/mse"]] == [5]  # continues, does not restart at 0


def test_test_reports_mean_and_confidence_interval(workdir, capsys, caplog):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "2"])
    main(["test", *FAST_SINUSOID, "--ckpt_path", "checkpoints/last.ckpt"])
    printed = re.search(r"test/mse = ([0-9.]+) ± [0-9.]+ \(95% CI\) after 2 meta-steps", caplog.text)
    assert printed
    table = capsys.readouterr().out
    assert "test/mse" in table and "test/mse_ci95" in table
    result = json.loads((workdir / "lightning_logs/version_1/test_result.json").read_text())
    assert result["metric"] == "test/mse" and result["episodes"] == 30 and result["meta_steps"] == 2
    assert f"{result['mean']:.4g}" == printed.group(1) and result["ci95"] > 0
    assert result["checkpoint"].endswith("last.ckpt")


def test_a_checkpoint_settings_sit_between_the_config_file_and_the_flags(workdir):
    """Config file < checkpoint < typed flags: a run trained with --model.solver.lam 2 and a
    smaller network tests with both under the config file's lam 0.5 and network, and a typed
    --model.batch_norm wins over the checkpoint."""
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "2", "--model.solver.lam", "2",
          "--model.net.init_args.hidden", "[16, 8]"])
    main(["test", *FAST_SINUSOID, "--ckpt_path", "checkpoints/last.ckpt",
          "--model.batch_norm", "support", "--model.test_inner_steps", "3"])
    config = yaml.safe_load((workdir / "lightning_logs/version_1/config.yaml").read_text())
    assert config["model"]["solver"]["lam"] == 2.0  # the checkpoint's, not the config file's
    assert config["model"]["net"]["init_args"]["hidden"] == [16, 8]
    assert config["model"]["batch_norm"] == "support" and config["model"]["test_inner_steps"] == 3
    result = json.loads((workdir / "lightning_logs/version_1/test_result.json").read_text())
    assert result["batch_norm"] == "support"

    # The same with ckpt_path set in a config file rather than typed.
    (workdir / "from_checkpoint.yaml").write_text("ckpt_path: checkpoints/last.ckpt\n")
    main(["test", *FAST_SINUSOID, "--config", "from_checkpoint.yaml"])
    config = yaml.safe_load((workdir / "lightning_logs/version_2/config.yaml").read_text())
    assert config["model"]["solver"]["lam"] == 2.0
    assert config["model"]["net"]["init_args"]["hidden"] == [16, 8]


def test_tensorboard_shows_training_internals_and_charts(workdir):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "4", "--charts.every_n_steps", "2"])
    log_dir = workdir / "lightning_logs" / "version_0"
    logged = scalars(log_dir)
    assert [v for _, v in logged["train/lam"]] == [0.5] * 4
    for tag in ("train/step_seconds", "train/tasks_per_second", "train/outer_lr",
                "train/inner_objective_after", "train/cg_iterations"):
        assert all(v > 0 and math.isfinite(v) for _, v in logged[tag]), tag
    events = EventAccumulator(str(log_dir))
    events.Reload()
    for tag in ("charts/inner_objective", "charts/cg_residual"):
        assert [image.step for image in events.Images(tag)] == [0, 2], tag


def test_scalars_are_computed_and_written_every_log_interval(workdir):
    """Diagnostics that cost compute are made only on the steps Lightning writes."""
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "7", "--trainer.log_every_n_steps", "3",
          "--trainer.val_check_interval", "7"])
    logged = scalars(workdir / "lightning_logs" / "version_0")
    for tag in ("train/query_loss_before", "train/query_loss_after", "train/lam"):
        assert [step for step, _ in logged[tag]] == [2, 5], tag
    assert all(before > after for (_, before), (_, after) in
               zip(logged["train/query_loss_before"], logged["train/query_loss_after"]))


def test_omniglot_fit_through_the_cli(workdir, omniglot_root, cache_dir):
    main(["fit", "--config", "configs/omniglot_5way_1shot.yaml",
          "--data.root", str(omniglot_root), "--data.init_args.cache_dir", str(cache_dir),
          "--data.init_args.meta_batch_size", "2", "--data.init_args.val_episodes", "4",
          "--model.solver.inner_steps", "2", "--model.net.init_args.hidden", "8",
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2",
          "--trainer.enable_progress_bar", "false", "--charts.every_n_steps", "1"])
    checkpoint = torch.load(workdir / "checkpoints" / "last.ckpt", weights_only=False)
    # 5 classes from the data; 8 channels x 2 x 2 flattened features from --model.net.init_args.hidden
    assert checkpoint["state_dict"]["net.classifier.weight"].shape == (5, 32)
    assert "val/acc" in scalars(workdir / "lightning_logs" / "version_0")
    events = EventAccumulator(str(workdir / "lightning_logs" / "version_0"))
    events.Reload()
    pictures = events.Images("charts/episode")  # one episode's images with their predicted labels
    assert [p.step for p in pictures] == [0, 1] and pictures[0].width > 300


@pytest.mark.parametrize("algorithm, inner_solver, curvature", [
    ("maml", "gd", "hessian"), ("reptile", "gd", "hessian"), ("imaml", "hf", "hessian"),
    ("imaml", "hf", "gauss_newton"), ("imaml", "gd", "gauss_newton")])
def test_baselines_inner_solvers_and_curvatures_train_through_the_cli(
        workdir, algorithm, inner_solver, curvature):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "2", "--model.solver.algorithm", algorithm,
          "--model.solver.inner_solver", inner_solver, "--model.solver.inner_steps", "2",
          "--model.solver.curvature", curvature])
    logged = scalars(workdir / "lightning_logs" / "version_0")
    assert "train/query_loss_after" in logged and "val/mse" in logged
    assert ("train/cg_residual" in logged) == (algorithm == "imaml")
    assert ("train/cg_returned_start" in logged) == (algorithm == "imaml")
    # The GD safeguard and HF's line search count the steps that did not lower G.
    assert all(v >= 0 for _, v in logged["train/inner_rejected_steps"])


@pytest.mark.slow
def test_compiled_solver_trains_as_the_eager_one(workdir, omniglot_root, cache_dir):
    """--model.compile_solver: the same meta-steps as eager (to float32 rounding: Inductor sums
    in another order), and a resumed run keeps compiling."""
    tiny = tiny_omniglot(omniglot_root, cache_dir)
    main(["fit", *tiny, "--trainer.max_steps", "2", "--checkpoint.dirpath", "eager"])
    main(["fit", *tiny, "--trainer.max_steps", "2", "--checkpoint.dirpath", "compiled",
          "--model.compile_solver", "true"])
    eager, compiled = (load(workdir / d / "last.ckpt") for d in ("eager", "compiled"))
    assert_compiled_trains_as_eager(compiled, eager)
    assert compiled["hyper_parameters"]["compile_solver"]
    main(["fit", *tiny, "--trainer.max_steps", "4", "--checkpoint.dirpath", "compiled",
          "--ckpt_path", "compiled/last.ckpt"])  # its settings, compile_solver among them
    resumed = load(workdir / "compiled/last.ckpt")
    assert resumed["global_step"] == 4 and resumed["hyper_parameters"]["compile_solver"]


def test_a_network_that_does_not_compile_is_one_clear_error(workdir):
    """The sinusoid's MLP: torch 2.14 cannot trace the Gauss-Newton product's jvp through its
    first layer under vmap (the one error the compiled solver turns into a SettingError)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "1", "--model.compile_solver", "true"])
    message = str(exit_info.value.code)
    assert "model.compile_solver=True is invalid here: torch.compile cannot compile" in message
    assert "\n" not in message.strip()


@pytest.mark.parametrize("flags, message", [
    (["--model.solver.lam", "0"], "model.solver.lam=0.0 is invalid"),
    (["--data.init_args.shots", "0"], "data.shots=0 is invalid"),
    (["--model.solver.hf_cg_steps", "0"], "model.solver.hf_cg_steps=0 is invalid"),
    (["--model.solver.inner_solver", "newton"],
     "model.solver.inner_solver='newton' is invalid: must be one of 'gd', 'adam', 'hf'"),
    (["--model.solver.inner_steps", "ten"], "model.solver.inner_steps='ten' is invalid: must be int"),
    (["--data.dataset", "imagenet"], "data.dataset='imagenet' is invalid: must be one of"),
    (["--ckpt_path", "nowhere.ckpt"], "ckpt_path='nowhere.ckpt' is invalid: no such file"),
    (["--trainer.max_steps", "-5"], "error: a trainer setting is invalid: `max_steps` must be"),
    (["--model.solver.curvature", "fisher"],
     "model.solver.curvature='fisher' is invalid: must be one of 'hessian', 'gauss_newton'"),
    (["--model.lr_schedule", "cosine", "--trainer.max_steps", "-1"],
     "model.lr_schedule_steps=-1 is invalid: must be > 0 with model.lr_schedule=cosine"),
])
def test_bad_setting_is_one_clear_error(workdir, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *FAST_SINUSOID, *flags])
    assert message in str(exit_info.value.code)


def test_cosine_schedule_decays_the_outer_learning_rate(workdir):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "4", "--model.lr_schedule", "cosine",
          "--model.outer_lr", "0.01"])
    logged = scalars(workdir / "lightning_logs" / "version_0")["train/outer_lr"]
    expected = [0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert [value for _, value in logged] == pytest.approx(expected, rel=1e-6)


def test_report_draws_curves_and_tabulates_results(workdir):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "4"])
    main(["test", *FAST_SINUSOID, "--ckpt_path", "checkpoints/last.ckpt"])
    run = subprocess.run([sys.executable, "-m", "imaml_lightning", "report", "lightning_logs",
                          "--out", "out"], capture_output=True, text=True, cwd=workdir)
    assert run.returncode == 0, run.stderr
    assert (workdir / "out/report.png").stat().st_size > 10_000
    table = (workdir / "out/report.md").read_text()
    assert re.search(r"\| lightning_logs \| sinusoid \| test/mse \| [0-9.]+ ± [0-9.]+ \| 30 \| 4 \|", table)
    bad = subprocess.run([sys.executable, "-m", "imaml_lightning", "report", "nowhere"],
                         capture_output=True, text=True, cwd=workdir)
    assert bad.returncode != 0 and "runs=['nowhere'] is invalid" in bad.stderr


def test_hparams_tab_holds_the_settings_and_the_score(workdir):
    main(["fit", *FAST_SINUSOID, "--trainer.max_steps", "4"])
    events = EventAccumulator(str(workdir / "lightning_logs" / "version_0"))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    session = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = session.session_start_info.hparams
    assert hparams["model.solver.lam"].number_value == 0.5
    assert hparams["data.init_args.shots"].number_value == 10
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    assert [m.name.tag for m in experiment.experiment.metric_infos] == ["hp/val_mse"]
    logged = scalars(workdir / "lightning_logs" / "version_0")
    placeholder, *scores = logged["hp/val_mse"]  # NaN until the first validation
    assert math.isnan(placeholder[1]) and scores == logged["val/mse"]
