"""One-off investigations: each answers one question (docs/studies/NAME.md holds its answer).

Run one as `python -m benchmarks.studies.NAME`."""
