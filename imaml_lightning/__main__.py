"""The command line, one entry point for `imaml-lightning SUBCOMMAND` (the installed script) and
`python -m imaml_lightning SUBCOMMAND`: fit, validate and test (LightningCLI), predict (a trained
model on a user's own examples) and report (plots and tables of finished runs)."""
import sys

from imaml_lightning.console import quiet_library_notices


def main() -> None:
    quiet_library_notices()
    subcommand = sys.argv[1:2]
    if subcommand == ["report"]:
        from imaml_lightning.report import main as report

        report(sys.argv[2:])
    elif subcommand == ["predict"]:
        from imaml_lightning.predict import main as predict

        predict(sys.argv[2:])
    else:  # LightningCLI reads sys.argv itself
        from imaml_lightning.cli import main as lightning_cli

        lightning_cli()


if __name__ == "__main__":
    main()
