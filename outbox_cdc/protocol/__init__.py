"""The protocol core: pure functions and state machines, no IO at all.

Bytes in, values out. Everything here is unit-tested with frames captured from a real server
(tests/data) and never touches a socket, a clock it was not given, or the environment.
"""
