"""Shared I/O: storage (local, S3), reading and decoding input images, and the output layout.

Every layer above uses it and it imports none of them, so the replica, the CLI and the job read and name
objects the same way.
"""
