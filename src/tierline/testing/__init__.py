"""A harness for testing Tierline applications against a real PostgreSQL, with real
``tierline`` processes, as Tierline's own tests and benchmarks do.

One concept per module; import the one you need (nothing here is imported eagerly):

- ``ports``: free local ports for started servers.
- ``waiting``: polling with a timeout (every wait has one).
- ``databases``: URLs, admin connections, scratch and template databases, migrating.
- ``routing``: how processes reach the database (direct, a pooler, a tier's role).
- ``postgres``: a private PostgreSQL server a test owns (settings, stop, crash).
- ``pgbouncer``: PgBouncer in transaction mode in front of a server.
- ``processes``: ``tierline`` subprocesses (``Proc``) and a test's ``Cluster``.
- ``http``: enqueueing over the HTTP API and waiting for readiness.

Started processes import ``TIERLINE_APP`` through this process's ``PYTHONPATH``: put the
folder of your application's module there.
"""
