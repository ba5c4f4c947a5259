"""The platform's bottom layer: errors, typed config loading, MLflow tracking defaults, storage and loopback helpers.

Every component (``model``, ``data_pipeline``, ``training``, ``inference``) may import these modules; they import no
component in turn, so the import graph only points down (README, "Layout").
"""
