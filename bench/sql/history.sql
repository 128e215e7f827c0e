-- Synthetic ledger history for the scaling measurement: :users history users with :per_user
-- entries each (one purchase of 10^6 tokens, then usage of 1 token per entry), keys random
-- uuids as real clients send them. History users are apart from the measured users 1..10000
-- (their uuids start at 10^8), and their books are consistent: balance = sum of entries, one
-- bucket holding the positive balance, balance_after a running sum.
--
-- Fast on purpose: the key and per-user indexes are dropped for the load and rebuilt once
-- (a sorted build instead of 10^7 random insertions), and foreign-key triggers are skipped
-- (session_replication_role) because the rows are consistent by construction. The append-only
-- trigger refuses only update, delete and truncate; inserts pass. Run as superuser.

set session_replication_role = replica;
set maintenance_work_mem = '512MB';
set max_parallel_maintenance_workers = 2;

insert into billing.accounts (user_id, balance)
select lpad(to_hex(100000000 + h), 32, '0')::uuid, 1000001 - :per_user
from generate_series(1, :users) as h;

with purchases as (
  insert into billing.ledger_entries (
    user_id, amount, balance_after, kind, idempotency_key, description
  )
  select lpad(to_hex(100000000 + h), 32, '0')::uuid, 1000000, 1000000, 'purchase',
    gen_random_uuid()::text, 'bench history'
  from generate_series(1, :users) as h
  returning id, user_id
)

insert into billing.credit_buckets (user_id, entry_id, amount, remaining)
select p.user_id, p.id, 1000000, 1000001 - :per_user
from purchases as p;

alter table billing.ledger_entries drop constraint ledger_entries_idempotency_key_unique;
drop index billing.ledger_entries_user_id_id_idx;

insert into billing.ledger_entries (user_id, amount, balance_after, kind, idempotency_key)
select lpad(to_hex(100000000 + h), 32, '0')::uuid, -1, 1000001 - n, 'usage',
  gen_random_uuid()::text
from generate_series(1, :users) as h
cross join generate_series(2, :per_user) as n;

alter table billing.ledger_entries
add constraint ledger_entries_idempotency_key_unique unique (idempotency_key);
create index ledger_entries_user_id_id_idx on billing.ledger_entries (user_id, id);

reset session_replication_role;

vacuum analyze billing.accounts;
vacuum analyze billing.ledger_entries;
vacuum analyze billing.credit_buckets;
