"""Properties: each takes a backend session and options and returns a CheckReport."""
