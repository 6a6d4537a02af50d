"""robovlms plugin (being written)."""
