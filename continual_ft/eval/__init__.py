"""Evaluating a model on a task, and the continual-learning metrics of the matrix R.

- :mod:`~continual_ft.eval.scoring`: a task scored (choice by log-likelihood, exact match of greedy answers)
- :mod:`~continual_ft.eval.predictions`: per-example predictions kept for every row of R, and their class scores
- :mod:`~continual_ft.eval.metrics`: ACC, BWT, FWT, forgetting, AIA and the largest drop from R
"""
