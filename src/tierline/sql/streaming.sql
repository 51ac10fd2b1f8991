-- Queries of the event streams (`tierline.streaming`), by name. The firehose's queries
-- (`firehose_after`, `firehose_head`) are in queries.sql. A job's stream is the view
-- `tierline.job_stream` (schema 7): its stored events and its `enqueued` event (seq 1)
-- from its row.

-- name: job_stream_heads
-- Where jobs' streams stand: state and the seq of the last event (written in the same
-- transaction as the event, so no stored event has a higher seq). Many jobs at once: a
-- burst of new streams costs one query per round, not one per stream.
SELECT id, state, event_seq FROM tierline.jobs WHERE id = ANY(%(ids)s::bigint[]);

-- name: job_event_pages
-- One replay page for each (job, after) pair, in one query; `ord` says which pair a row
-- answers (several streams of one job may stand at different positions).
SELECT c.ord, e.job_id, e.seq, e.type, e.queue, e.kind, e.data, e.at
FROM unnest(%(job_ids)s::bigint[], %(afters)s::int[]) WITH ORDINALITY AS c(job_id, after, ord)
CROSS JOIN LATERAL (
    SELECT * FROM tierline.job_stream e
    WHERE e.job_id = c.job_id AND e.seq > c.after
    ORDER BY e.seq
    LIMIT %(limit)s
) e
ORDER BY c.ord, e.seq;

-- name: jobs_events_after
-- The event hub's catch-up of many followed jobs at once (one query per batch of
-- notifications). One index range scan per job, each bounded: a plain join would merge
-- over the whole primary key, slower as the table grows.
SELECT e.job_id, e.seq, e.type, e.queue, e.kind, e.data, e.at
FROM unnest(%(job_ids)s::bigint[], %(afters)s::int[]) AS c(job_id, after)
CROSS JOIN LATERAL (
    SELECT * FROM tierline.job_stream e
    WHERE e.job_id = c.job_id AND e.seq > c.after
    ORDER BY e.seq
    LIMIT %(limit)s
) e
ORDER BY e.job_id, e.seq
LIMIT %(limit)s;
