-- Migration: creator payouts: settled earnings paid out by Stripe Transfer, once per period.
--
-- Purpose: `token-billing creators payout` calls begin_creator_payouts, which, for each creator
-- whose account has payouts_enabled, takes the settled earnings (entries older than
-- billing.settings.creator_earnings_hold; debits count at once) in whole cents when they reach
-- billing.settings.creator_payout_minimum_cents: one payout row per creator and period (unique),
-- and a payout entry in the earnings ledger in the same transaction, so a second run (concurrent,
-- or a retry) finds the row and pays nothing new. The command then creates the Stripe Transfer
-- with the payout's idempotency key (creator-payout:<creator>:<period>), so a retry after a
-- timeout gets the same transfer back, and records it (complete_creator_payout). A transfer
-- Stripe refused is failed (fail_creator_payout: the money returns to the balance, kind
-- payout_returned); transfer.reversed returns what was reversed the same way.
-- Fractions of a cent stay in the balance (a payout is floor(settled / 10^6) cents).
-- Objects: billing.creator_payouts, public.begin_creator_payouts(), public.complete_creator_payout(),
--   public.fail_creator_payout(), billing.apply_transfer_event(), public.my_creator_payouts(),
--   public.list_creator_payouts().
--
-- Lock order: one run at a time (a transaction advisory lock), creator rows in ascending
-- user_id (for no key update), as the earnings ledger's debits take them.

create table billing.creator_payouts (
  id uuid primary key default gen_random_uuid(),
  creator_id uuid not null references billing.creators (user_id),
  period text not null,
  amount_cents bigint not null,
  currency text not null,
  stripe_account_id text not null,
  idempotency_key text not null unique,
  status text not null default 'pending',
  stripe_transfer_id text unique,
  reversed_cents bigint not null default 0,
  failure text,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint creator_payouts_one_per_period unique (creator_id, period),
  constraint creator_payouts_period_format check (period ~ '^[0-9]{4}-[0-9]{2}-[0-9]{2}$'),
  constraint creator_payouts_amount_positive check (amount_cents > 0),
  constraint creator_payouts_status_known check (status in ('pending', 'paid', 'failed')),
  constraint creator_payouts_paid_has_transfer check ((status = 'paid') = (stripe_transfer_id is not null)),
  constraint creator_payouts_reversed_valid check (reversed_cents between 0 and amount_cents)
);

comment on table billing.creator_payouts is
'One Stripe Transfer per creator and period: pending from the moment its amount left the '
'earnings balance (kind payout) until Stripe answered; paid with the transfer; failed (the '
'amount returned to the balance) when Stripe refused it.';
comment on column billing.creator_payouts.id is 'Payout id (the transfer''s metadata.payout_id).';
comment on column billing.creator_payouts.creator_id is 'The creator paid.';
comment on column billing.creator_payouts.period is 'The payout period, a UTC date YYYY-MM-DD.';
comment on column billing.creator_payouts.amount_cents is 'The transfer''s amount, minor units.';
comment on column billing.creator_payouts.currency is 'ISO currency code of the transfer.';
comment on column billing.creator_payouts.stripe_account_id is 'The destination account.';
comment on column billing.creator_payouts.idempotency_key is
'The Stripe Idempotency-Key of its transfer: creator-payout:<creator>:<period>.';
comment on column billing.creator_payouts.status is 'pending, paid or failed.';
comment on column billing.creator_payouts.stripe_transfer_id is 'The transfer, tr_...';
comment on column billing.creator_payouts.reversed_cents is 'The transfer''s amount_reversed returned to the balance.';
comment on column billing.creator_payouts.failure is 'Why Stripe refused it.';
comment on column billing.creator_payouts.created_at is 'When the run made it.';
comment on column billing.creator_payouts.updated_at is 'When the row last changed.';

alter table billing.creator_payouts enable row level security;

create policy creator_payouts_select_own on billing.creator_payouts
for select to authenticated
using (creator_id = (select auth.uid()));

revoke all on billing.creator_payouts from public, anon, authenticated, service_role;
grant select on billing.creator_payouts to authenticated, service_role;

create function public.begin_creator_payouts(
  p_period date default null,
  p_as_of timestamptz default null,
  p_dry_run boolean default false
) returns table (
  payout_id uuid,
  creator_id uuid,
  stripe_account_id text,
  period text,
  amount_cents bigint,
  currency text,
  idempotency_key text,
  status text
)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
set jit = off
as $$
declare
  -- p_as_of null: now (a default of now() would hide the next argument from the installer's parser).
  v_as_of timestamptz := coalesce(p_as_of, now());
  v_period text := to_char(coalesce(p_period, (v_as_of at time zone 'UTC')::date), 'YYYY-MM-DD');
  v_settings billing.settings;
  v_creator billing.creators;
  v_settled bigint;
  v_cents bigint;
  v_payout billing.creator_payouts;
begin
  -- One run at a time: a concurrent run waits, then finds this run's payouts.
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token-billing:creator_payouts'));
  select s.* into v_settings from billing.settings as s;

  for v_creator in
    select c.* from billing.creators as c
    where c.payouts_enabled and c.deauthorized_at is null
    order by c.user_id
    for no key update
  loop
    if exists (
      select 1 from billing.creator_payouts as p
      where p.creator_id = v_creator.user_id and p.period = v_period
    ) then
      continue;
    end if;
    select coalesce(sum(e.amount_microcents), 0)::bigint into v_settled
    from billing.creator_earnings as e
    where e.creator_id = v_creator.user_id
      and (e.amount_microcents < 0 or e.created_at <= v_as_of - v_settings.creator_earnings_hold);
    -- Whole cents, rounded down: the fraction stays in the balance for the next payout.
    v_cents := greatest(v_settled, 0) / 1000000;
    if v_cents < v_settings.creator_payout_minimum_cents then
      continue;
    end if;
    if p_dry_run then
      payout_id := null;
      creator_id := v_creator.user_id;
      stripe_account_id := v_creator.stripe_account_id;
      period := v_period;
      amount_cents := v_cents;
      currency := 'usd';
      idempotency_key := format('creator-payout:%s:%s', v_creator.user_id, v_period);
      status := 'would_pay';
      return next;
      continue;
    end if;
    insert into billing.creator_payouts as p (
      creator_id, period, amount_cents, currency, stripe_account_id, idempotency_key
    )
    values (
      v_creator.user_id, v_period, v_cents, 'usd', v_creator.stripe_account_id,
      format('creator-payout:%s:%s', v_creator.user_id, v_period)
    )
    returning p.* into v_payout;
    insert into billing.creator_earnings (
      creator_id, kind, amount_microcents, idempotency_key, payout_id, metadata
    )
    values (
      v_creator.user_id, 'payout', -v_cents * 1000000, 'payout:' || v_payout.id::text, v_payout.id,
      jsonb_build_object('period', v_period, 'as_of', v_as_of)
    );
  end loop;

  if p_dry_run then
    return;
  end if;
  -- Every payout still pending (this run's, and earlier runs' that got no answer from Stripe).
  return query
  select p.id, p.creator_id, p.stripe_account_id, p.period, p.amount_cents, p.currency,
    p.idempotency_key, p.status
  from billing.creator_payouts as p
  where p.status = 'pending'
  order by p.creator_id, p.period;
end;
$$;

comment on function public.begin_creator_payouts(date, timestamptz, boolean) is
'Makes this period''s payouts (p_period, default the UTC date of p_as_of, default now): for each creator with '
'payouts_enabled and settled earnings of at least creator_payout_minimum_cents, once per creator '
'and period, a pending payout of floor(settled / 10^6) cents and its payout entry. Returns every '
'pending payout (to transfer, or to retry with the same key); with p_dry_run, what it would make, '
'writing nothing.';

revoke all on function public.begin_creator_payouts(date, timestamptz, boolean) from public, anon, authenticated;
grant execute on function public.begin_creator_payouts(date, timestamptz, boolean) to service_role;

create function public.complete_creator_payout(
  p_payout_id uuid,
  p_transfer jsonb
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_payout billing.creator_payouts;
  v_id text := p_transfer ->> 'id';
begin
  if v_id is null or v_id !~ '^tr_[A-Za-z0-9_]{1,250}$' then
    raise exception using
      errcode = '22023',
      message = format('p_transfer must be a Stripe transfer (tr_...), got %s',
        left(coalesce(p_transfer::text, 'null'), 200));
  end if;
  select p.* into v_payout from billing.creator_payouts as p where p.id = p_payout_id for update;
  if not found then
    raise exception using errcode = '22023', message = format('payout %s not found', p_payout_id);
  end if;
  if (billing.stripe_bigint(p_transfer -> 'amount', 'p_transfer.amount'), lower(p_transfer ->> 'currency'),
      billing.stripe_ref(p_transfer -> 'destination'))
    is distinct from (v_payout.amount_cents, v_payout.currency, v_payout.stripe_account_id) then
    raise exception using
      errcode = 'TBPAY',
      message = format('transfer %s (%s %s to %s) is not payout %s (%s %s to %s)', v_id,
        p_transfer ->> 'amount', p_transfer ->> 'currency', p_transfer ->> 'destination',
        v_payout.id, v_payout.amount_cents, v_payout.currency, v_payout.stripe_account_id);
  end if;
  if v_payout.status = 'paid' and v_payout.stripe_transfer_id = v_id then
    return query select 'duplicate'::text, format('payout %s was already paid by %s', v_payout.id, v_id);
    return;
  end if;
  if v_payout.status <> 'pending' then
    raise exception using
      errcode = 'TBPAY',
      message = format('payout %s is %s (transfer %s), not pending', v_payout.id, v_payout.status,
        coalesce(v_payout.stripe_transfer_id, 'none'));
  end if;
  update billing.creator_payouts as p
  set status = 'paid', stripe_transfer_id = v_id, updated_at = now()
  where p.id = v_payout.id;
  return query select 'applied'::text, format('payout %s: %s %s to %s by transfer %s', v_payout.id,
    v_payout.amount_cents, v_payout.currency, v_payout.stripe_account_id, v_id);
end;
$$;

comment on function public.complete_creator_payout(uuid, jsonb) is
'Records the Stripe Transfer of a pending payout (its amount, currency and destination checked). '
'Statuses: applied, duplicate (the same transfer again). 22023 for an unknown payout or not a '
'transfer; TBPAY for another transfer or a payout that is not pending.';

revoke all on function public.complete_creator_payout(uuid, jsonb) from public, anon, authenticated;
grant execute on function public.complete_creator_payout(uuid, jsonb) to service_role;

create function public.fail_creator_payout(
  p_payout_id uuid,
  p_reason text
) returns table (status text, detail text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_payout billing.creator_payouts;
begin
  select p.* into v_payout from billing.creator_payouts as p where p.id = p_payout_id for update;
  if not found then
    raise exception using errcode = '22023', message = format('payout %s not found', p_payout_id);
  end if;
  if v_payout.status = 'failed' then
    return query select 'duplicate'::text, format('payout %s already failed', v_payout.id);
    return;
  end if;
  if v_payout.status <> 'pending' then
    raise exception using
      errcode = 'TBPAY',
      message = format('payout %s was paid by %s: it cannot fail', v_payout.id, v_payout.stripe_transfer_id);
  end if;
  update billing.creator_payouts as p
  set status = 'failed', failure = left(coalesce(p_reason, 'refused'), 500), updated_at = now()
  where p.id = v_payout.id;
  insert into billing.creator_earnings (
    creator_id, kind, amount_microcents, idempotency_key, payout_id, metadata
  )
  values (
    v_payout.creator_id, 'payout_returned', v_payout.amount_cents * 1000000,
    'payout-failed:' || v_payout.id::text, v_payout.id,
    jsonb_build_object('reason', left(coalesce(p_reason, 'refused'), 500))
  );
  return query select 'applied'::text, format('payout %s failed: %s cents back to the balance',
    v_payout.id, v_payout.amount_cents);
end;
$$;

comment on function public.fail_creator_payout(uuid, text) is
'Marks a pending payout failed (Stripe refused its transfer) and returns its amount to the '
'creator''s balance (kind payout_returned). Statuses: applied, duplicate. 22023 unknown payout; '
'TBPAY for a paid one.';

revoke all on function public.fail_creator_payout(uuid, text) from public, anon, authenticated;
grant execute on function public.fail_creator_payout(uuid, text) to service_role;

create function billing.apply_transfer_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_transfer jsonb := billing.require_stripe_object(p_event, 'transfer');
  v_id text := v_transfer ->> 'id';
  v_reversed bigint := greatest(coalesce(
    billing.stripe_bigint(v_transfer -> 'amount_reversed', 'amount_reversed'), 0), 0);
  v_payout billing.creator_payouts;
  v_sale_id text;
  v_delta bigint;
begin
  select p.* into v_payout from billing.creator_payouts as p
  where p.stripe_transfer_id = v_id
    or (p.stripe_transfer_id is null and p.id::text = v_transfer #>> '{metadata,payout_id}')
  for update;
  if found then
    v_reversed := least(v_reversed, v_payout.amount_cents);
    v_delta := v_reversed - v_payout.reversed_cents;
    if v_delta <= 0 then
      return query select 'duplicate'::text, format('payout %s: %s cents reversed, already returned',
        v_payout.id, v_reversed);
      return;
    end if;
    update billing.creator_payouts as p
    set reversed_cents = v_reversed, updated_at = now()
    where p.id = v_payout.id;
    insert into billing.creator_earnings (
      creator_id, kind, amount_microcents, idempotency_key, payout_id, metadata
    )
    values (
      v_payout.creator_id, 'payout_returned', v_delta * 1000000,
      format('transfer-reversal:%s:%s', v_id, v_reversed), v_payout.id,
      jsonb_build_object('stripe_event_id', p_event ->> 'id', 'amount_reversed', v_reversed)
    );
    return query select 'applied'::text, format(
      'payout %s: transfer %s reversed by %s cents, %s back to creator %s''s balance', v_payout.id,
      v_id, v_reversed, v_delta, v_payout.creator_id);
    return;
  end if;

  -- A sale's transfer (destination charge) reversed by a refund with reverse_transfer.
  update billing.marketplace_sales as s
  set
    stripe_transfer_id = v_id,
    transfer_reversed_cents = greatest(s.transfer_reversed_cents, v_reversed),
    updated_at = now()
  where s.stripe_transfer_id = v_id
    or (s.stripe_charge_id is not null and s.stripe_charge_id = billing.stripe_ref(v_transfer -> 'source_transaction'))
  returning s.id into v_sale_id;
  if v_sale_id is not null then
    return query select 'applied'::text, format('agent sale %s: transfer %s reversed by %s cents',
      v_sale_id, v_id, v_reversed);
    return;
  end if;
  return query select 'ignored'::text, format('transfer %s is neither a payout nor a sale''s', v_id);
end;
$$;

comment on function billing.apply_transfer_event(jsonb) is
'transfer.reversed / transfer.updated: a payout''s reversal returns the newly reversed cents to '
'the creator''s balance (kind payout_returned, once per amount_reversed); a sale''s transfer '
'records its amount_reversed; any other transfer is ignored.';

revoke all on function billing.apply_transfer_event(jsonb) from public;

create function public.my_creator_payouts()
returns table (
  id uuid,
  period text,
  amount_cents bigint,
  currency text,
  status text,
  stripe_transfer_id text,
  reversed_cents bigint,
  created_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select p.id, p.period, p.amount_cents, p.currency, p.status, p.stripe_transfer_id,
    p.reversed_cents, p.created_at
  from billing.creator_payouts as p
  where p.creator_id = (select auth.uid())
  order by p.created_at desc, p.id
$$;

comment on function public.my_creator_payouts() is
'The signed-in creator''s payouts, newest first, read through RLS.';

revoke all on function public.my_creator_payouts() from public, anon, authenticated;
grant execute on function public.my_creator_payouts() to authenticated;

create function public.list_creator_payouts(p_creator_id uuid)
returns table (
  id uuid,
  period text,
  amount_cents bigint,
  currency text,
  status text,
  stripe_transfer_id text,
  reversed_cents bigint,
  created_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select p.id, p.period, p.amount_cents, p.currency, p.status, p.stripe_transfer_id,
    p.reversed_cents, p.created_at
  from billing.creator_payouts as p
  where p.creator_id = p_creator_id
  order by p.created_at desc, p.id
  limit 100
$$;

comment on function public.list_creator_payouts(uuid) is
'A creator''s latest 100 payouts, newest first (the service''s GET /v1/creators/me). Security '
'invoker: service_role reads billing.creator_payouts itself.';

revoke all on function public.list_creator_payouts(uuid) from public, anon, authenticated;
grant execute on function public.list_creator_payouts(uuid) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202800400', 'creator_payouts');
