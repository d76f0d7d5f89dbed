"""Protocol-faithful simulated hardware for tests, benchmarks and the demo.

Imports nothing of ``agent``, ``drivers``, ``policies`` or ``domain``: the agent
must not pass a test by sharing code with the thing it controls.
"""
