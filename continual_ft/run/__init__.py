"""One continual run: set up, checked, stage by stage, recorded, resumable.

- :mod:`~continual_ft.run.runner`: ``run(config)`` and ``resume(run_dir)``
- :mod:`~continual_ft.run.checks`: every check across settings, before anything is written
- :mod:`~continual_ft.run.record`: ``results.json`` as the run builds it
- :mod:`~continual_ft.run.checkpoint`: checkpoints between stages (inside one: :mod:`continual_ft.train.checkpoint`)
"""
