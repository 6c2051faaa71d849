"""What a run shows: its result files and tables, plots and trackers.

- :mod:`~continual_ft.report.results`: ``results.json``/``results.csv`` read and written, the printed tables
- :mod:`~continual_ft.report.plots`: heatmaps of R and the stream plot
- :mod:`~continual_ft.report.tracking`: TensorBoard, W&B and MLflow
"""
