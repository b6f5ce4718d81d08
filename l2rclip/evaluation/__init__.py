"""Evaluation: predictions over a split, conformal intervals, figures, result tables, protocol runs.

Import the module you need (`l2rclip.evaluation.predictions`, `.conformal`, ...); nothing is imported here.
"""
