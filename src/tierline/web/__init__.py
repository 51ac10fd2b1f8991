"""The web tier's HTTP side. For the application's routes: ``connection`` and
``read_connection`` lend a connection of the tier's budgeted pool (``connections.py``)."""

from tierline.web.connections import connection, read_connection

__all__ = ["connection", "read_connection"]
