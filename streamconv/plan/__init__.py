"""Planning: what the output is made of, chunk by chunk, before a byte is read (pure)."""
