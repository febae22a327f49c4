"""Recipes as data, their runner, its state and report, and the ratio sweep."""
