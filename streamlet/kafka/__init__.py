"""Kafka: the decisions streamlet makes about Kafka, apart from the I/O that carries them out.

The sources and the sink live in :mod:`streamlet.sources.kafka` and
:mod:`streamlet.sinks.kafka`; what they decide is here, as pure functions
tested without a broker (:mod:`streamlet.kafka.policy`).
"""
