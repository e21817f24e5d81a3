"""The egress daemon: Kiln's guest DNS and transparent egress proxy, in a process of their own."""
