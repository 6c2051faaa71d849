"""What a run shows: its result files, tables, plots and trackers.

- :mod:`~continual_ft.report.results`: ``results.json`` read back, ``results.csv`` written
- :mod:`~continual_ft.report.tables`: the printed tables and the one markdown table builder of the reports
- :mod:`~continual_ft.report.plots`: heatmaps of R and the stream plot
- :mod:`~continual_ft.report.tracking`: TensorBoard, W&B and MLflow
"""
