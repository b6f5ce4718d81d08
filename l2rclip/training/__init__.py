"""Training: the loop and its schedules, optimiser, resumable state, frozen-feature cache, DDP, baselines.

Import the module you need (`l2rclip.training.loop`, `.resume`, ...); nothing is imported here.
"""
