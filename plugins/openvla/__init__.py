"""openvla plugin (being written)."""
