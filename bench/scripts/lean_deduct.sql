-- The lean rewrite of the seed guide (reference/seed_guide_lean.sql) on accounts :first..:last,
-- a fresh event_id per call; profiles.id is its primary key.
\set uid random(:first, :last)
select seed_guide_lean.deduct_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text
);
