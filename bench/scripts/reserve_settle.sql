-- One reservation pair: reserve an estimate, then settle the actual cost (two round trips and
-- two transactions, as a service does around a model call). One pgbench transaction = one pair.
\set uid random(1, 10000)
select reservation_id as rid
from public.reserve_tokens(lpad(to_hex(:uid::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select * from public.settle_reservation(:rid::uuid, 7);
