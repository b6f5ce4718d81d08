"""DVC stage entry points: each a pure function plus a thin `main(argv)` for `python -m`."""
