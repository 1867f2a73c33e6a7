import sys

if sys.argv[1:2] == ["report"]:  # plots and tables of finished runs; everything else is LightningCLI
    from imaml_lightning.report import main as report

    report(sys.argv[2:])
else:
    from imaml_lightning.cli import main

    main()
