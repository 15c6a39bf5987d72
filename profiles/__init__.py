"""chunkft profiles."""
