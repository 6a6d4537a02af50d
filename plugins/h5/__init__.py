"""h5 plugin (being written)."""
