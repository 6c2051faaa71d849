"""Bridges to other libraries, each imported only when its module is.

- :mod:`~continual_ft.integrations.hf_trainer`: our strategies inside the Hugging Face ``Trainer``
- :mod:`~continual_ft.integrations.avalanche`: our scenarios as Avalanche benchmarks, our strategies as its plugin
- :mod:`~continual_ft.integrations.avalanche_loops`: Avalanche's own strategies (``strategy=avalanche:ewc``) as loops
"""
