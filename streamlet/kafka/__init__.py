"""Kafka for streamlet: the sources, the sink, and what they decide, split by role.

* :mod:`~streamlet.kafka.source`: ``KafkaSource``, the base of both kinds of
  source; ``KafkaSource(topic, ...)`` builds the kind ``mode`` asks for.
* :mod:`~streamlet.kafka.direct`: ``KafkaDirectSource``, read by offset ranges.
* :mod:`~streamlet.kafka.receiver`: ``KafkaReceiver``, consumed into the data WAL.
* :mod:`~streamlet.kafka.sink`: ``KafkaSink``, a transaction per batch.
* :mod:`~streamlet.kafka.config`: the validated settings of both.
* :mod:`~streamlet.kafka.policy`: the decisions, as pure functions tested
  without a broker.

The private modules hold the I/O: ``_consumer`` and ``_link`` (the consumer
and what both kinds of source share), ``_producer`` (the producer), and
``_aiokafka``, the one place that touches aiokafka's private parts, checked
at the first use rather than at import. Import the public names from
``streamlet``; nothing is imported here, so that ``streamlet.sources`` and
``streamlet.sinks`` can import these modules without a cycle.
"""
