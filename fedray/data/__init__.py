"""Datasets: folder catalogs, synthetic smears, splits, hospital shards and transforms."""
