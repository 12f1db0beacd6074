from .notify_sensor import notify_sensors
from .queue_sensor import queue_sensor

__all__ = ["notify_sensors", "queue_sensor"]
