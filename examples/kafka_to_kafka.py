"""Kafka → Kafka, exactly once: each order's total in cents, keyed by customer.

A batch reads a logged offset range of ``orders`` (JSON such as
``{"customer": "c7", "items": [{"price": 2.5, "qty": 2}]}``) and writes one
record per order to ``order-totals`` in a Kafka transaction that also commits
the input offsets to the ``order-totals`` consumer group. Kill the worker at
any moment: after a restart the batch in flight runs again over the same
offsets, the old worker's open transaction is aborted (the new one fences it
by its transactional id), and a ``read_committed`` consumer of
``order-totals`` sees every order exactly once, in order per customer.

Run it against your broker::

    STREAMLET_KAFKA=localhost:9092 streamlet run examples.kafka_to_kafka:app
"""

from __future__ import annotations

import os
from typing import TypedDict, cast

import orjson

import streamlet as sl

BOOTSTRAP = os.environ.get("STREAMLET_KAFKA", "localhost:9092")
ORDERS = os.environ.get("STREAMLET_TOPIC", "orders")
TOTALS = os.environ.get("STREAMLET_OUTPUT_TOPIC", "order-totals")

app = sl.App("order_totals", state_dir=".streamlet/order_totals", batch_interval=0.5)
orders_source = sl.KafkaSource(
    ORDERS, bootstrap_servers=BOOTSTRAP, group_id="order-totals", start="earliest"
)


class Item(TypedDict):
    price: float
    qty: int


class Order(TypedDict):
    customer: str
    items: list[Item]


def parse_order(value: bytes) -> Order:
    """An order from its JSON; anything else raises, and goes to the dead letters."""
    order = orjson.loads(value)
    if not (
        isinstance(order, dict)
        and isinstance(order.get("customer"), str)
        and isinstance(order.get("items"), list)
    ):
        raise TypeError(f"not an order: {value[:80]!r}")
    return cast(Order, order)


# decode's result is each record's ``data``: a handler of Batch[Order] sees Orders.
orders = app.source(orders_source, name="orders", decode=parse_order)


def _key(output: object) -> bytes:
    assert isinstance(output, dict)
    return str(output["customer"]).encode()


@app.handler(
    orders,
    sink=sl.KafkaSink(TOTALS, bootstrap_servers=BOOTSTRAP, key=_key, consume_from=orders_source),
)
async def order_totals(batch: sl.Batch[Order]) -> list[dict[str, object]]:
    """One output per order: customer, the order's offset, total in cents."""
    totals: list[dict[str, object]] = []
    for record in batch:
        order = record.data
        cents = sum(round(item["price"] * 100) * item["qty"] for item in order["items"])
        totals.append(
            {
                "customer": order["customer"],
                "partition": record.partition,
                "offset": record.offset,
                "cents": cents,
            }
        )
    return totals
