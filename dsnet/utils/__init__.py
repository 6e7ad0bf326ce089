"""Small helpers with no model knowledge: atomic file writes, provenance, allocator tuning."""
