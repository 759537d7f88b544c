"""Ray tasks that build engines in parallel, one per (GPU type, engine spec)."""

__all__: list[str] = []
