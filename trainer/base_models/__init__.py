"""Base models: loading (offline), family detection, the built-in models. See family.py for the extension point."""
