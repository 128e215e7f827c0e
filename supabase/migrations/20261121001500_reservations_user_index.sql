-- Migration: index only the pending reservations by user.
--
-- Purpose: settling or releasing a reservation changes its status, which the pending-expiry
-- index's predicate reads, so that update is never HOT and writes a new entry into every full
-- index of the table. reservations_user_id_idx was one of them, and nothing on a hot path reads
-- reservations by user: check_invariants() scans them all, and the question a user (through
-- RLS) or an operator asks by user is "what is held now". A partial index answers that, and
-- a resolution no longer adds an entry to it.
-- Measured: reserve_tokens x10 then one settle_reservations, 8 clients, 4 interleaved pgbench
-- pairs: 1.05-1.10x with this index in place of the full one (dropping it: 1.07-1.21x).
-- Objects: reservations_pending_user_id_idx (replaces reservations_user_id_idx).

drop index billing.reservations_user_id_idx;

create index reservations_pending_user_id_idx on billing.reservations (user_id)
where status = 'pending';
