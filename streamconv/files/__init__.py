"""Files as every stage touches them: exact reads and writes, CRC-32, the page cache, atomic commits."""
