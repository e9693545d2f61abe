"""Runnable examples (scripts) that use zoo."""
