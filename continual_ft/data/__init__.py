"""The task stream, as a scenario declares it (imports nothing above :mod:`continual_ft.config`).

- :mod:`~continual_ft.data.spec`: what one ``tasks:`` entry asks for (``TaskSpec``), the schema users write in YAML
- :mod:`~continual_ft.data.sources`: the loaders behind ``source:`` (built-in corpora, local files, HF datasets)
- :mod:`~continual_ft.data.tasks`: tasks as prompt/answer examples split by group (``Example``, ``build_task``)
- :mod:`~continual_ft.data.scenario`: a YAML scenario as stages over named tasks (``Scenario``, ``load_scenario``)
"""
