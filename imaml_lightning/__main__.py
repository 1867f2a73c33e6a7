from imaml_lightning.cli import main

main()
