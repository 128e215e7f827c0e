-- public.deduct_tokens on accounts :first..:last (pgbench -D; one hot account: first = last),
-- a fresh idempotency key per call. The uuid of account n is indexed: an index lookup per call.
\set uid random(:first, :last)
select * from public.deduct_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text, 'bench'
);
