"""Helpers users can reuse in their own tests.

Submodules are imported on demand so that a test importing one helper does
not pay for the others: :mod:`streamlet.testing.kafka` runs a real Kafka
broker on loopback, :mod:`streamlet.testing.faultfs` simulates power loss and
I/O faults under anything that writes through :mod:`streamlet.fs`.
"""
