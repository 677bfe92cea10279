"""Registering a cohort: many image pairs from a CSV file, run on a Dask cluster (``same-register-batch``).

``pairs`` reads the CSV, ``task`` is what a worker does with one pair, ``results`` is the results
table, ``cluster`` starts or reaches the Dask cluster, ``cli`` is the command.
"""
