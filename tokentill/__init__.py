"""tokentill."""
