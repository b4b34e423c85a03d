"""Solutions to the lessons' exercises, one module per lesson; tests/test_lessons.py grades them."""
