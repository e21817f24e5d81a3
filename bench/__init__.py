"""Kiln's benchmark suite (``kiln bench``); see README.md.

It lives in the checkout next to ``kiln/``, not in the installed package: it
drives a kiln server from the outside and QEMU directly, the way an operator
would, so it needs nothing from kiln beyond what it documents reusing.
"""
