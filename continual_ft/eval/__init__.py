"""Evaluating a model on a task, and the continual-learning metrics of the matrix R.

- :mod:`~continual_ft.eval.scoring`: a choice task scored (log-likelihood over its labels; greedy exact match)
- :mod:`~continual_ft.eval.score`: what scoring a task gives back (``TaskScore``), and how test prompts are batched
- :mod:`~continual_ft.eval.generative`: a generative task scored (greedy batched decoding, every metric per example)
- :mod:`~continual_ft.eval.text_metrics`: exact match, token F1, ROUGE, chrF, BLEU, edit similarity
- :mod:`~continual_ft.eval.predictions`: per-example predictions kept for every row of R, and their class scores
- :mod:`~continual_ft.eval.metrics`: ACC, BWT, FWT, forgetting, AIA and the largest drop from R
"""
