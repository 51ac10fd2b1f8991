-- Queries of the event streams (`tierline.streaming`), by name. The replay and fan-out
-- queries themselves live beside the queries that write events, in queries.sql.

-- name: job_stream_head
-- Where a job's stream stands: its state and the seq of its last event (written in the
-- same transaction as the event, so no stored event has a higher seq).
SELECT state, event_seq FROM tierline.jobs WHERE id = %(id)s;
