"""Studies over many runs: ``compare`` and ``tune``, and the statistics over seeds they report.

- :mod:`~continual_ft.study.compare`: a grid of configurations run or read, side by side
- :mod:`~continual_ft.study.over_seeds`: runs that differ only in ``seed`` grouped, with their intervals
- :mod:`~continual_ft.study.intervals`: Student t intervals over seeds, bootstrap over examples
- :mod:`~continual_ft.study.tune`: Optuna search over a run's settings
- :mod:`~continual_ft.study.search_space`: what ``tune`` searches and maximises
- :mod:`~continual_ft.study.tune_report`: the report a ``tune`` leaves
"""
