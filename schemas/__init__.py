"""Package data of kalm_store: the JSON declarations of stored tables."""
