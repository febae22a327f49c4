"""Scores: how much a layer, and each unit inside a layer, matters (layer and unit criteria, one registry each)."""
