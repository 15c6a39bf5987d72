"""chunkft executor."""

if __name__ != "chunkft.executor":  # this folder imported by its bare name from a checkout
    raise ImportError(f"import chunkft.executor, not {__name__} (chunkft's packages are chunkft.*)")


