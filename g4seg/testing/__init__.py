"""Tiny random models of the real classes, saved like Hub repos (for tests and ``g4seg doctor --smoke``)."""
