from .queue_sensor import queue_sensor

__all__ = ["queue_sensor"]
