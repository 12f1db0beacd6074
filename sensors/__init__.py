from .models_sensor import models_sensor
from .notify_sensor import notify_sensors
from .queue_sensor import queue_sensor

__all__ = ["models_sensor", "notify_sensors", "queue_sensor"]
