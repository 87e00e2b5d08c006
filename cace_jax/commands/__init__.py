"""Command-line plumbing: flags, one-line errors, config checks before any work."""
