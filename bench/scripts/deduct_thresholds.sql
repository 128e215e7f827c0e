-- public.deduct_tokens of 1 token on 10,000 accounts of a plan with alert thresholds (20% and
-- 0) and auto top-up, far above every threshold (issue 17): the cost of the crossing check when
-- nothing is crossed, against deduct.sql on accounts without auto top-up.
\set uid random(40001, 50000)
select * from public.deduct_tokens(
  lpad(to_hex(:uid::integer), 32, '0')::uuid, 1, gen_random_uuid()::text, 'bench'
);
