"""l2rclip: ordinal classification with CLIP (L2RCLIP, NeurIPS 2023) as a library and pipeline.

Importing the package is free of side effects: no network, no files written, no seeding, and the
heavy dependencies (torch, open_clip) load only when a submodule that needs them is imported.
"""

__version__ = "0.1.0"
