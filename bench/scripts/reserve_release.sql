-- One reservation that is released: reserve an estimate, then lift the hold (a call that failed
-- before it used anything). Two round trips and two transactions; one pgbench transaction = one
-- pair.
\set uid random(1, 10000)
select reservation_id as rid
from public.reserve_tokens(lpad(to_hex(:uid::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select * from public.release_reservation(:rid::uuid);
