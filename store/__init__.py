"""pairforge."""
