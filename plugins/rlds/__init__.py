"""rlds plugin (being written)."""
