"""chunkft reports."""
