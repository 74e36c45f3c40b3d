"""Shared fixtures: the image-data helpers' cache isolation is available to every test."""

from conftest_images import isolated_cache

__all__ = ["isolated_cache"]
