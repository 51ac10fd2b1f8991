"""Integrations with other frameworks, each an optional extra (``tierline[django]``).

Nothing here is imported by Tierline itself; a subpackage needs its framework installed.
"""
