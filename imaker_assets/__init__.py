"""Dagster definitions of instrumental-maker (assets, jobs, checks). See ``definitions``."""
