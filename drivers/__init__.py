"""Drivers: the only code that touches hardware (and the only code importing vendor libraries)."""
