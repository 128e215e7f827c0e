-- Ten reservations, each its own call and transaction as requests come in, then one
-- settle_reservations of all ten (a worker settling finished calls in bulk). One pgbench
-- transaction = ten reserve + settle pairs.
\set u1 random(1, 10000)
\set u2 random(1, 10000)
\set u3 random(1, 10000)
\set u4 random(1, 10000)
\set u5 random(1, 10000)
\set u6 random(1, 10000)
\set u7 random(1, 10000)
\set u8 random(1, 10000)
\set u9 random(1, 10000)
\set u10 random(1, 10000)
select reservation_id as r1
from public.reserve_tokens(lpad(to_hex(:u1::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r2
from public.reserve_tokens(lpad(to_hex(:u2::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r3
from public.reserve_tokens(lpad(to_hex(:u3::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r4
from public.reserve_tokens(lpad(to_hex(:u4::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r5
from public.reserve_tokens(lpad(to_hex(:u5::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r6
from public.reserve_tokens(lpad(to_hex(:u6::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r7
from public.reserve_tokens(lpad(to_hex(:u7::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r8
from public.reserve_tokens(lpad(to_hex(:u8::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r9
from public.reserve_tokens(lpad(to_hex(:u9::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select reservation_id as r10
from public.reserve_tokens(lpad(to_hex(:u10::integer), 32, '0')::uuid, 10, gen_random_uuid()::text) \gset
select count(*) from public.settle_reservations(jsonb_build_array(
  jsonb_build_object('reservation_id', :r1::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r2::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r3::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r4::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r5::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r6::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r7::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r8::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r9::uuid, 'amount', 7),
  jsonb_build_object('reservation_id', :r10::uuid, 'amount', 7)
));
