-- The seed guide's deduct_tokens, 10,000 accounts, a fresh event_id per call.
\set uid random(1, 10000)
select seed_guide.deduct_tokens(lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text);
