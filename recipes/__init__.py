"""Training recipes built on kerasbn; each runnable with ``python -m``."""
