"""Builders shared by tests: tiny models made offline, in seconds."""
