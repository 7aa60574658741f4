"""Reproduction studies: runs x seeds from one command, aggregated into tables, figures and JSON.

    python -m moejax.study compare                  # runs/studies/compare/...
    python -m moejax.study compare --steps 100 --seeds 0 1
    python -m moejax.study compare --write-docs     # also rewrites docs/studies/compare.*
    make study STUDY=compare

A study file `experiments/studies/<name>.py` returns a `Study` (`spec.py`): runs (an experiment
file and "path=value" overrides) x seeds, and the metrics to report. The modules, in the order a
study goes through them:

    spec.py        Study, Run, Evaluation; loading a study file; one validated Job per (run, seed)
    runner.py      what is done (finished, to resume, new, failed) and running the rest, each job
                   in its own `python -m moejax.main` process, with a progress line; then
                   the study's extra evaluations of each finished run (`moejax.evaluate`)
    aggregate.py   each run's metrics over its seeds (mean, std with ddof=1, n), from metrics.jsonl
    report.py      the markdown table and the JSON; a short reading of each metric
    figures.py     the PNG figures (the notebook draws the same from the JSON)
    __main__.py    the command line
"""

from moejax.study.spec import (TOKENS_PER_SEC, Evaluation, Job, Run, Study, StudyError,
                               load_study)

__all__ = ["TOKENS_PER_SEC", "Evaluation", "Job", "Run", "Study", "StudyError", "load_study"]
