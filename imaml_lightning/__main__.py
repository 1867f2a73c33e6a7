import sys

if sys.argv[1:2] == ["report"]:  # plots and tables of finished runs
    from imaml_lightning.report import main as report

    report(sys.argv[2:])
elif sys.argv[1:2] == ["predict"]:  # a trained model on a user's own examples
    from imaml_lightning.predict import main as predict

    predict(sys.argv[2:])
else:  # fit, validate, test: LightningCLI
    from imaml_lightning.cli import main

    main()
