-- public.add_tokens on accounts kept apart from the deduct workloads (see fixtures.sql).
\set uid random(20001, 30000)
select * from public.add_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text, 'purchase'
);
