"""Capture rules as data: `plan` decides what to match, one renderer per backend decides how to say it."""
