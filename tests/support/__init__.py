"""Helpers shared by the test files (never import one test file from another)."""
