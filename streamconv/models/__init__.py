"""ModelSpec (parsed from config.json) and one module of mapping rules per model family."""
