"""Kubeflow pipelines of tlpipe: the DAG (transfer_learning.py) and its compiled YAML."""
