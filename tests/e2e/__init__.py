"""End-to-end tests: real servers and a real browser."""
