-- public.record_usage, one item at a per-unit price (1 token a unit), 10,000 accounts, a fresh
-- idempotency key per call: priced and charged as deduct_tokens charges 1.
\set uid random(1, 10000)
select * from public.record_usage(lpad(to_hex(:uid::integer), 32, '0')::uuid, '[{"meter": "bench.unit", "quantity": 1}]', gen_random_uuid()::text);
