-- Tierline schema, version 5: connection claims on the read replica.
--
-- A web replica with `TIERLINE_DATABASE_READ_URL` holds a second pool on the read replica,
-- a server with its own `max_connections`. It claims that pool in the same registry row,
-- under the same budget lock, against the replica's budget: `read_claimed` sums to at most
-- the replica's budget as `claimed` does to the primary's. `read_requested_pool` and
-- `read_pool_max` are what it asked for and what it got (0: no read pool).
ALTER TABLE tierline.replicas
    ADD COLUMN read_requested_pool integer NOT NULL DEFAULT 0,
    ADD COLUMN read_pool_max       integer NOT NULL DEFAULT 0,
    ADD COLUMN read_claimed        integer NOT NULL DEFAULT 0;
