-- public.record_usage, one item at a graduated price with 4 tiers (accumulated over the
-- user's billing period: the period's usage records are summed under the account lock).
\set uid random(1, 10000)
select * from public.record_usage(lpad(to_hex(:uid::integer), 32, '0')::uuid, '[{"meter": "bench.tiered", "quantity": 1}]', gen_random_uuid()::text);
