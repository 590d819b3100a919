"""One module per CLI verb; each exposes `run(...) -> dict` (the JSON summary)."""
