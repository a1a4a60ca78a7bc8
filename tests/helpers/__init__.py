"""Plain helpers shared by several test modules (data builders, fake files, comparisons).

Test modules import from here (``from helpers.engine import slices``) and never from one another; shared *fixtures*
live in ``tests/conftest.py``. ``tests/test_layout_of_tests.py`` enforces both. Nothing here is collected by pytest
(no ``test_`` names), and nothing runs at import beyond defining functions and constants.
"""
