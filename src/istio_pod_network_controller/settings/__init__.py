"""Settings: annotation keys, the typed InterceptSpec and its strict parsers, the downward-API file (pure)."""
