"""Data set builders for amused."""
