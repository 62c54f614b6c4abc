"""The Celery application that test_celery.py runs against Warren.

The worker subprocess loads it with `celery -A celery_app worker` and takes
the broker URL from $WARREN_CELERY_BROKER_URL. The test process builds its own
client with create_app(url) for each broker it starts, so no connection pool
outlives the broker it was made for.

Only the broker URL and the result backend are set: everything else is
Celery's default, which is what a user moving from RabbitMQ to Warren gets.
"""

from __future__ import annotations

import os
import time

from celery import Celery

BROKER_URL_ENV = "WARREN_CELERY_BROKER_URL"


def create_app(broker_url: str) -> Celery:
    app = Celery("celery_app", broker=broker_url, backend="rpc://", set_as_current=False)

    # Explicit names make every app built here run the same tasks as the
    # worker's. shared=False keeps each app's tasks to itself: shared tasks
    # are copied into every app created later in the process, which would
    # register each name twice when the tests build one client per broker.
    @app.task(name="celery_app.add", shared=False)
    def add(x, y):
        return x + y

    @app.task(name="celery_app.stamp", shared=False)
    def stamp(tag):
        # When the task ran, by the worker's clock (the test's clock too: they
        # run on one machine), to check a countdown against the send time.
        return {"tag": tag, "ran_at": time.time()}

    @app.task(name="celery_app.delivery", bind=True, shared=False)
    def delivery(self):
        # How the message reached the worker: the exchange and routing key
        # the broker delivered it with and the priority property it carried.
        info = self.request.delivery_info or {}
        return {
            "exchange": info.get("exchange"),
            "routing_key": info.get("routing_key"),
            "priority": info.get("priority"),
            "hostname": self.request.hostname,
        }

    return app


# The worker's app. In the test process the variable is unset and this app is
# never used (Celery connects lazily: building it opens no connection).
app = create_app(os.environ.get(BROKER_URL_ENV, "amqp://guest:guest@localhost:5672//"))
