"""Data: sources (one adapter per dataset), validation, splits and torch datasets.

Nothing is imported here, so `import l2rclip.data.sources` stays cheap (no torch); import the
submodule you need.
"""
