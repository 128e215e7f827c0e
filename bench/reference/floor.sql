-- Reference: the floor. What a debit costs Postgres itself: a bare
-- `update accounts set balance = balance - 1 ... returning` and a ledger insert, in ONE
-- statement (a data-modifying CTE), no function, no idempotency key, no balance check, no
-- buckets. Plain tables with default storage settings and a primary key only.
--
-- The statement the bench runs is in bench/scripts/floor_deduct.sql and floor_hot.sql.
-- Loaded by bench/run.py into the bench database only.

create schema if not exists bench_floor;

create table bench_floor.accounts (
  user_id uuid primary key,
  balance bigint not null default 0
);

create table bench_floor.ledger (
  id bigint generated always as identity primary key,
  user_id uuid not null,
  amount bigint not null,
  balance_after bigint not null,
  created_at timestamptz not null default now()
);

grant usage on schema bench_floor to service_role;
grant select, update on bench_floor.accounts to service_role;
grant select, insert on bench_floor.ledger to service_role;

-- The floor's statement as an RPC: the same one statement inside a security definer plpgsql
-- function with `set search_path = ''`, returning (status, balance, entry_id) as
-- public.deduct_tokens does. No idempotency, no funds check, no CHECK constraints. Measured next
-- to the floor, it is the ceiling any function-based RPC can reach on this machine; the bench
-- reports it as information (script bench/scripts/floor_rpc_deduct.sql).
create function bench_floor.deduct(p_user_id uuid, p_amount bigint)
returns table (status text, balance bigint, entry_id bigint)
language plpgsql
security definer
set search_path = ''
as $$
begin
  with debited as (
    update bench_floor.accounts as a
    set balance = a.balance - p_amount
    where a.user_id = p_user_id
    returning a.user_id, a.balance
  )

  insert into bench_floor.ledger (user_id, amount, balance_after)
  select d.user_id, -p_amount, d.balance
  from debited as d
  returning ledger.balance_after, ledger.id into balance, entry_id;
  status := 'applied';
  return next;
end;
$$;

revoke all on function bench_floor.deduct(uuid, bigint) from public;
grant execute on function bench_floor.deduct(uuid, bigint) to service_role;
