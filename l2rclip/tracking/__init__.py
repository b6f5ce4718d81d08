"""Tracking: MLflow runs (`runs`), what made a run (`provenance`) and its datasets (`datasets`).

Nothing is imported here, so reading provenance does not import MLflow.
"""
