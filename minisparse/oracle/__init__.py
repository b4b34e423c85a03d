"""The functional oracle of SPEC section 10: pure NumPy reference functions (in progress)."""
