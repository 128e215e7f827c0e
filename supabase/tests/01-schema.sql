-- Shape of the ledger: schemas, tables, columns, functions, RLS, comments, realtime.
begin;
set local search_path = extensions, public;
select plan(31);

select has_schema('billing', 'schema billing should exist');

select has_table('billing', 'accounts', 'billing.accounts should exist');
select has_table('billing', 'ledger_entries', 'billing.ledger_entries should exist');
select has_table('billing', 'credit_buckets', 'billing.credit_buckets should exist');
select has_table('billing', 'reservations', 'billing.reservations should exist');
select has_table('billing', 'products', 'billing.products should exist');

select col_type_is('billing', 'accounts', 'balance', 'bigint', 'accounts.balance should be bigint');
select col_type_is('billing', 'accounts', 'reserved', 'bigint', 'accounts.reserved should be bigint');
select col_type_is('billing', 'accounts', 'user_id', 'uuid', 'accounts.user_id should be uuid');
select columns_are(
  'billing', 'accounts',
  array[
    'user_id', 'balance', 'reserved', 'undrawn', 'held_expired', 'plan', 'subscription_status',
    'created_at', 'updated_at', 'past_due_since', 'alert_levels'
  ],
  'accounts should have the contract''s columns'
);
select col_type_is(
  'billing', 'ledger_entries', 'amount', 'bigint', 'ledger_entries.amount should be bigint'
);
select col_not_null(
  'billing', 'ledger_entries', 'idempotency_key', 'every ledger entry should carry a key'
);
select col_is_unique(
  'billing', 'ledger_entries', 'idempotency_key',
  'ledger idempotency keys should be unique (idempotency lives in the database)'
);
select col_is_unique(
  'billing', 'reservations', 'idempotency_key', 'reservation idempotency keys should be unique'
);

select has_function(
  'public', 'add_tokens',
  array['uuid', 'bigint', 'text', 'text', 'text', 'timestamp with time zone', 'jsonb'],
  'public.add_tokens should have the contract''s signature'
);
select has_function(
  'public', 'deduct_tokens', array['uuid', 'bigint', 'text', 'text', 'jsonb'],
  'public.deduct_tokens should have the contract''s signature'
);
select has_function(
  'public', 'reserve_tokens', array['uuid', 'bigint', 'text', 'interval'],
  'public.reserve_tokens should have the contract''s signature'
);
select has_function(
  'public', 'settle_reservation', array['uuid', 'bigint'],
  'public.settle_reservation should have the contract''s signature'
);
select has_function(
  'public', 'release_reservation', array['uuid'],
  'public.release_reservation should have the contract''s signature'
);
select has_function(
  'public', 'expire_tokens', array['timestamp with time zone'],
  'public.expire_tokens should have the contract''s signature'
);
select has_function(
  'public', 'my_tokens', array[]::text[],
  'public.my_tokens should have the contract''s signature'
);
select isnt_definer(
  'public', 'my_tokens', array[]::text[],
  'my_tokens should be security invoker (it reads through RLS)'
);

select is_empty(
  $$
    select c.relname
    from pg_class as c
    join pg_namespace as n on n.oid = c.relnamespace
    where n.nspname = 'billing' and c.relkind in ('r', 'p') and not c.relrowsecurity
  $$,
  'every billing table should have row level security enabled'
);

select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p
    join pg_namespace as n on n.oid = p.pronamespace
    where n.nspname in ('billing', 'public')
      and p.prosecdef
      and not coalesce(p.proconfig @> array['search_path=""'], false)
  $$,
  'every security definer function should pin search_path to the empty string'
);

select is_empty(
  $$
    select c.relname
    from pg_class as c
    join pg_namespace as n on n.oid = c.relnamespace
    where n.nspname = 'billing' and c.relkind in ('r', 'p')
      and obj_description(c.oid, 'pg_class') is null
  $$,
  'every billing table should have a comment'
);

select is_empty(
  $$
    select c.relname || '.' || a.attname
    from pg_attribute as a
    join pg_class as c on c.oid = a.attrelid
    join pg_namespace as n on n.oid = c.relnamespace
    where n.nspname = 'billing' and c.relkind in ('r', 'p') and a.attnum > 0
      and not a.attisdropped and col_description(c.oid, a.attnum) is null
  $$,
  'every billing column should have a comment'
);

select is_empty(
  $$
    select p.oid::regprocedure::text
    from pg_proc as p
    join pg_namespace as n on n.oid = p.pronamespace
    where (n.nspname = 'billing'
        or (n.nspname = 'public' and p.proowner = 'postgres'::regrole))
      and obj_description(p.oid, 'pg_proc') is null
  $$,
  'every token-billing function should have a comment'
);

select ok(
  exists (
    select 1 from pg_publication_tables
    where pubname = 'supabase_realtime' and schemaname = 'billing' and tablename = 'accounts'
  ),
  'billing.accounts should be in the supabase_realtime publication'
);

select is(
  (
    select array_agg(tablename::text order by tablename) from pg_publication_tables
    where pubname = 'supabase_realtime' and schemaname = 'billing'
  ),
  array['accounts', 'notifications'],
  'only billing.accounts and billing.notifications should be published (ledger rows stay off the wire)'
);

select trigger_is(
  'billing', 'ledger_entries', 'tg_ledger_entries__10_refuse_change',
  'billing', 'tg_ledger_entries__refuse_change',
  'ledger entries should be guarded by the append-only trigger'
);

select trigger_is(
  'auth', 'users', 'tg_users__50_open_billing_account',
  'billing', 'tg_users__open_account',
  'auth.users should open a billing account on insert'
);

select * from finish();
rollback;
