"""Model files as users bring them.

The supported formats, checked for unsafe content before they are loaded.
"""
