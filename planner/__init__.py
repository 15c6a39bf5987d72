"""chunkft planner."""
