-- The floor on accounts :first..:last: one statement, no function, no idempotency
-- (reference/floor.sql); accounts.user_id is its primary key.
\set uid random(:first, :last)
with debited as (
  update bench_floor.accounts set balance = balance - 1
  where user_id = lpad(to_hex(:uid::integer), 32, '0')::uuid
  returning user_id, balance
)
insert into bench_floor.ledger (user_id, amount, balance_after)
select user_id, -1, balance from debited
returning id;
