"""chunkft planner."""

if __name__ != "chunkft.planner":  # this folder imported by its bare name from a checkout
    raise ImportError(f"import chunkft.planner, not {__name__} (chunkft's packages are chunkft.*)")


