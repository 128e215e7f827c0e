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
