"""Ties the components together: the ``varsr`` CLI, typed config loading, cluster / MLflow / DeepSpeed recipes."""
