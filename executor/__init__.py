"""chunkft executor."""
