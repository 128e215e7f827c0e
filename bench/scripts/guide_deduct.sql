-- The seed guide's deduct_tokens (reference/seed_guide_token_billing.sql) on accounts
-- :first..:last, a fresh event_id per call. Its body resolves unqualified names: run with
-- search_path = seed_guide (bench/run.py). users.id is its primary key: an index lookup per call.
\set uid random(:first, :last)
select * from seed_guide.deduct_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, 'bench', gen_random_uuid()::text
);
