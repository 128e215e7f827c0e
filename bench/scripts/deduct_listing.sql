-- public.deduct_tokens of 1 token on 10,000 accounts, its metadata naming one creator's agent
-- listing (issue 19): deduct_tokens accrues the creator's share in the same transaction (an
-- insert into billing.creator_earnings). Against deduct.sql on the same accounts.
\set uid random(1, 10000)
select * from public.deduct_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text, 'bench',
  '{"listing": "bench_agent"}'
);
