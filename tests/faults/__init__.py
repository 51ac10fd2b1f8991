"""Fault-injection tests: real processes, real PostgreSQL, things going wrong on purpose."""
