-- Live statistics behind the replica recommendations (`tierline.recommend`). Both read a
-- bounded sample through an index, so computing a recommendation never scans the jobs
-- table however long the retention.

-- name: recent_arrivals
-- Jobs enqueued in the window, from the newest ids (the primary key, walked backwards).
-- When the sample is full the rate is sample / its time span instead.
SELECT count(*) FILTER (WHERE created_at > now() - make_interval(secs => %(window_s)s))
           AS in_window,
       count(*) AS sampled,
       extract(epoch FROM now() - min(created_at)) AS span_s
FROM (SELECT created_at FROM tierline.jobs ORDER BY id DESC LIMIT %(limit)s) s;

-- name: recent_service_time
-- Mean run time of the newest finished attempts (the partial index on finished jobs).
SELECT count(*) AS n, avg(extract(epoch FROM finished_at - started_at)) AS mean_s
FROM (SELECT started_at, finished_at FROM tierline.jobs
      WHERE state IN ('succeeded', 'failed', 'cancelled')
        AND finished_at > now() - make_interval(secs => %(window_s)s)
      ORDER BY finished_at DESC LIMIT %(limit)s) s
WHERE started_at IS NOT NULL AND finished_at >= started_at;
