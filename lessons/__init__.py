"""The lessons as a package, for `python -m lessons.render` and the graded `lessons.solutions`."""
