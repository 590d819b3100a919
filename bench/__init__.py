"""Research and measurement scripts (GPU staging, benchmarks, ablations), importable modules run
as `python -m bench.NAME` from the repository root. Product entry points live in the package
(`ggtalker demo`, the verbs); the bench table is `make bench` (`python -m bench.run_all`)."""
