"""siteagent: one import namespace over the repository's top-level folders.

``siteagent/agent`` is a symbolic link to ``../agent``, and so on: the folders stay at
the top level (DESIGN.md's layout), and nothing installs under a generic top-level
name such as ``agent`` or ``domain``.
"""
