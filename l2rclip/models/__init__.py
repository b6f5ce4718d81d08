"""Backbone loading, rank prompts, RankFormer, prompt text encoding and the L2RCLIP model."""
