-- Migration: reservations (two-phase usage).
--
-- Purpose: an agent request reserves an estimate before it runs, then settles the actual cost
-- or releases the hold. A reservation is pending, then settled, released or expired, exactly
-- once, and never edited after that (trigger). While pending, its amount counts in
-- accounts.reserved and is not available to other usage.
-- Objects: billing.reservations (+ guard trigger), public.reserve_tokens(),
--   public.settle_reservation(), public.release_reservation(), billing.check_invariants().
--
-- Lock order: reserve_tokens locks the account, then inserts. settle, release and expiry lock
-- the reservation (the update that resolves it), then the account. Nothing locks an account and
-- then waits for an existing reservation, so the two orders cannot deadlock.

-- One function holds the row rules, for the reason given at billing.ledger_entry_is_valid: a
-- CHECK is parsed again by every statement that writes the table, and a reservation is written
-- twice (reserve, settle) on the hot path.
create function billing.reservation_is_valid(
  p_amount bigint,
  p_idempotency_key text,
  p_status text,
  p_settle_amount bigint,
  p_resolved_at timestamptz
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return coalesce(
    p_amount > 0
    and length(p_idempotency_key) between 1 and 255
    and (
      (p_status = 'pending' and p_resolved_at is null and p_settle_amount is null)
      or (p_status = 'settled' and p_resolved_at is not null and p_settle_amount > 0)
      or (
        p_status in ('released', 'expired')
        and p_resolved_at is not null
        and p_settle_amount is null
      )
    ),
    false
  );
end;
$$;

comment on function billing.reservation_is_valid(bigint, text, text, bigint, timestamptz) is
'CHECK of billing.reservations: a positive amount, a key of 1..255 characters, and a status '
'consistent with its resolution (pending: unresolved; settled: resolved with a positive '
'settle_amount; released or expired: resolved without one).';

revoke all on function billing.reservation_is_valid(bigint, text, text, bigint, timestamptz)
from public;

create table billing.reservations (
  id uuid primary key default gen_random_uuid(),
  -- No foreign key: reserve_tokens writes the row in the statement that locks its account (a
  -- foreign key would cost a query per hold); billing.check_invariants() reports an orphan.
  user_id uuid not null,
  amount bigint not null,
  idempotency_key text not null,
  status text not null default 'pending',
  available_after bigint not null,
  expires_at timestamptz not null,
  settle_amount bigint,
  created_at timestamptz not null default now(),
  resolved_at timestamptz,
  constraint reservations_idempotency_key_unique unique (idempotency_key),
  constraint reservations_valid check (
    billing.reservation_is_valid(amount, idempotency_key, status, settle_amount, resolved_at)
  )
);

-- expire_tokens() finds the pending reservations past their TTL.
create index reservations_pending_expiry_idx on billing.reservations (expires_at)
where status = 'pending';
-- What is held now, per user (RLS reads, operators). Partial: settling or releasing changes the
-- status, which the expiry index's predicate reads, so that update is never HOT and writes an
-- entry into every full index; a resolved reservation leaves this one instead.
create index reservations_pending_user_id_idx on billing.reservations (user_id)
where status = 'pending';

comment on table billing.reservations is
'Holds on tokens: pending, then settled, released or expired exactly once, never edited again. '
'Per user, accounts.reserved = sum(amount) of pending reservations.';
comment on column billing.reservations.id is 'Reservation id, passed to settle and release.';
comment on column billing.reservations.user_id is 'The account the hold is on.';
comment on column billing.reservations.amount is 'Tokens held while pending.';
comment on column billing.reservations.idempotency_key is
'Unique: retrying reserve_tokens with the same key returns this reservation.';
comment on column billing.reservations.status is 'pending, settled, released or expired.';
comment on column billing.reservations.available_after is
'Available tokens right after the hold was placed (returned again to duplicates).';
comment on column billing.reservations.expires_at is
'After this, expire_tokens releases the hold (status expired).';
comment on column billing.reservations.settle_amount is
'The amount settle_reservation was asked to charge; the ledger entry keyed '
'reservation:<id> holds what was actually charged.';
comment on column billing.reservations.created_at is 'When the hold was placed.';
comment on column billing.reservations.resolved_at is 'When it left pending.';

create function billing.tg_reservations__guard_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'UPDATE'
    and old.status = 'pending'
    and new.status <> 'pending'
    and (new.id, new.user_id, new.amount, new.idempotency_key, new.available_after,
      new.expires_at, new.created_at)
    is not distinct from (old.id, old.user_id, old.amount, old.idempotency_key,
      old.available_after, old.expires_at, old.created_at) then
    return new;
  end if;
  raise exception using
    errcode = 'TBAPP',
    message = format('reservation %s cannot be changed: %s of a %s reservation refused',
      old.id, tg_op, old.status),
    hint = 'A reservation leaves pending once, through settle, release or expiry.';
end;
$$;

comment on function billing.tg_reservations__guard_change() is
'Trigger: the only change a reservation accepts is leaving pending once; deletes are refused.';

revoke all on function billing.tg_reservations__guard_change() from public;

create trigger tg_reservations__10_guard_change
before update or delete on billing.reservations
for each row execute function billing.tg_reservations__guard_change();

alter table billing.reservations enable row level security;

create policy reservations_select_own on billing.reservations
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.reservations from public, anon, authenticated, service_role;
grant select on billing.reservations to authenticated, service_role;

-- RPCs ----------------------------------------------------------------------------------------

create function public.reserve_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_ttl interval default '15 minutes'
) returns table (status text, reservation_id uuid, available bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_first billing.reservations;
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0 then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_key('p_idempotency_key', p_idempotency_key);
  end if;
  if p_ttl is null or p_ttl <= interval '0' or p_ttl > interval '7 days' then
    raise exception using
      errcode = '22023',
      message = format('p_ttl must be between 0 and 7 days, got %s', coalesce(p_ttl::text, 'null'));
  end if;

  -- One statement: lock the account and place the hold, then write the reservation unless its
  -- key exists already. One row if the hold was placed, with the reservation's id unless the key
  -- was taken.
  with held as (
    update billing.accounts as a
    set reserved = a.reserved + p_amount, updated_at = now()
    where a.user_id = p_user_id and a.balance - a.reserved >= p_amount
    returning a.balance - a.reserved as available
  ),

  reservation as (
    insert into billing.reservations (user_id, amount, idempotency_key, available_after, expires_at)
    select p_user_id, p_amount, p_idempotency_key, held.available, now() + p_ttl
    from held
    on conflict (idempotency_key) do nothing
    returning id
  )

  select held.available, reservation.id
  into available, reservation_id
  from held
  left join reservation on true;

  if reservation_id is not null then
    status := 'applied';
    return next;
    return;
  end if;

  if available is not null then
    -- The key was used before: lift the hold again (we still hold the lock) and replay.
    update billing.accounts as a
    set reserved = a.reserved - p_amount
    where a.user_id = p_user_id;
  end if;

  select * into v_first
  from billing.reservations as r
  where r.idempotency_key = p_idempotency_key;

  if found then
    if v_first.user_id <> p_user_id or v_first.amount <> p_amount
      or v_first.expires_at - v_first.created_at <> p_ttl then
      raise exception using
        errcode = 'TBKEY',
        message = format(
          'idempotency key %L was already used with different arguments (reservation %s)',
          p_idempotency_key, v_first.id);
    end if;
    return query select 'duplicate'::text, v_first.id, v_first.available_after;
    return;
  end if;

  return query
  select 'insufficient_funds'::text, null::uuid, a.balance - a.reserved
  from billing.accounts as a
  where a.user_id = p_user_id;
  if not found then
    return query select 'unknown_account'::text, null::uuid, null::bigint;
  end if;
end;
$$;

comment on function public.reserve_tokens(uuid, bigint, text, interval) is
'Holds tokens for a request (pending until settled, released or expired after p_ttl). '
'Statuses: applied, duplicate, insufficient_funds, unknown_account. 22023 on invalid arguments, '
'TBKEY on a key reused with another user or amount.';

revoke all on function public.reserve_tokens(uuid, bigint, text, interval)
from public, anon, authenticated;
grant execute on function public.reserve_tokens(uuid, bigint, text, interval) to service_role;

create function public.settle_reservation(
  p_reservation_id uuid,
  p_amount bigint
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_charge bigint;
  v_balance bigint;
  v_entry_id bigint;
  v_first billing.reservations;
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000 then
    perform billing.require_amount('p_amount', p_amount);
  end if;

  -- One statement. Resolve the reservation first: that row lock is what makes it resolve
  -- exactly once. Then lock the account: up to the reserved amount the charge always
  -- succeeds; the excess comes from what is available besides this hold, never below zero.
  -- Then write the entry.
  with resolved as (
    update billing.reservations as r
    set status = 'settled', settle_amount = p_amount, resolved_at = now()
    where r.id = p_reservation_id and r.status = 'pending'
    returning r.user_id, r.amount
  ),

  before as (
    select
      a.user_id,
      resolved.amount as held,
      least(p_amount, resolved.amount + greatest(a.balance - a.reserved, 0)) as charge
    from billing.accounts as a
    inner join resolved on a.user_id = resolved.user_id
    for no key update of a
  ),

  charged as (
    update billing.accounts as a
    set
      reserved = a.reserved - before.held,
      balance = a.balance - before.charge,
      undrawn = a.undrawn + before.charge,
      updated_at = now()
    from before
    where a.user_id = before.user_id
    returning a.user_id, a.balance, before.charge
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, reservation_id, description
    )
    select
      charged.user_id, -charged.charge, charged.balance, 'usage',
      'reservation:' || p_reservation_id::text, p_reservation_id, 'Settled reservation'
    from charged
    returning id, balance_after, -amount as charge
  )

  select entry.id, entry.balance_after, entry.charge
  into v_entry_id, v_balance, v_charge
  from entry;

  if v_entry_id is null then
    select * into v_first from billing.reservations as r where r.id = p_reservation_id;
    if not found then
      raise exception using
        errcode = 'TBRES',
        message = format('reservation %s not found', coalesce(p_reservation_id::text, 'null'));
    end if;
    if v_first.status = 'settled' and v_first.settle_amount = p_amount then
      return query
      select 'duplicate'::text, e.balance_after, e.id
      from billing.ledger_entries as e
      where e.idempotency_key = 'reservation:' || p_reservation_id::text;
      return;
    end if;
    return query
    select 'not_pending'::text, a.balance, null::bigint
    from billing.accounts as a
    where a.user_id = v_first.user_id;
    return;
  end if;

  status := case when v_charge < p_amount then 'partial' else 'applied' end;
  balance := v_balance;
  entry_id := v_entry_id;
  return next;
end;
$$;

comment on function public.settle_reservation(uuid, bigint) is
'Charges the actual usage of a pending reservation and releases the rest of the hold. Up to '
'the reserved amount it always succeeds; above it the excess comes from available, capped at '
'zero (status partial). Statuses: applied, partial, duplicate, not_pending. TBRES if unknown.';

revoke all on function public.settle_reservation(uuid, bigint) from public, anon, authenticated;
grant execute on function public.settle_reservation(uuid, bigint) to service_role;

create function public.release_reservation(
  p_reservation_id uuid
) returns table (status text, available bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_user_id uuid;
  v_reserved bigint;
  v_first billing.reservations;
begin
  update billing.reservations as r
  set status = 'released', resolved_at = now()
  where r.id = p_reservation_id and r.status = 'pending'
  returning r.user_id, r.amount into v_user_id, v_reserved;

  if not found then
    select * into v_first from billing.reservations as r where r.id = p_reservation_id;
    if not found then
      raise exception using
        errcode = 'TBRES',
        message = format('reservation %s not found', coalesce(p_reservation_id::text, 'null'));
    end if;
    return query
    select
      case when v_first.status = 'released' then 'duplicate' else 'not_pending' end,
      a.balance - a.reserved
    from billing.accounts as a
    where a.user_id = v_first.user_id;
    return;
  end if;

  return query
  update billing.accounts as a
  set reserved = a.reserved - v_reserved, updated_at = now()
  where a.user_id = v_user_id
  returning 'applied'::text, a.balance - a.reserved;
end;
$$;

comment on function public.release_reservation(uuid) is
'Lifts a pending hold without charging. Statuses: applied, duplicate (already released; '
'returns the current available), not_pending (settled or expired). TBRES if unknown.';

revoke all on function public.release_reservation(uuid) from public, anon, authenticated;
grant execute on function public.release_reservation(uuid) to service_role;

-- Invariants ----------------------------------------------------------------------------------

create function billing.check_invariants() returns table (
  user_id uuid, problem text, expected bigint, actual bigint
)
language sql stable
set search_path = ''
as $$
  with entry_totals as (
    select e.user_id, sum(e.amount)::bigint as total
    from billing.ledger_entries as e
    group by e.user_id
  ),

  pending_totals as (
    select r.user_id, sum(r.amount)::bigint as total
    from billing.reservations as r
    where r.status = 'pending'
    group by r.user_id
  ),

  bucket_totals as (
    select b.user_id, sum(b.remaining)::bigint as total
    from billing.credit_buckets as b
    group by b.user_id
  ),

  chain as (
    select
      e.user_id,
      e.id,
      e.balance_after,
      sum(e.amount) over (partition by e.user_id order by e.id) as running
    from billing.ledger_entries as e
  )

  select a.user_id, 'balance = sum(ledger_entries.amount)', coalesce(t.total, 0), a.balance
  from billing.accounts as a
  left join entry_totals as t on a.user_id = t.user_id
  where a.balance <> coalesce(t.total, 0)
  union all
  select a.user_id, 'reserved = sum(pending reservations)', coalesce(p.total, 0), a.reserved
  from billing.accounts as a
  left join pending_totals as p on a.user_id = p.user_id
  where a.reserved <> coalesce(p.total, 0)
  union all
  select
    a.user_id, 'greatest(sum(buckets.remaining) - undrawn, 0) = greatest(balance, 0)',
    greatest(a.balance, 0), greatest(coalesce(b.total, 0) - a.undrawn, 0)
  from billing.accounts as a
  left join bucket_totals as b on a.user_id = b.user_id
  where greatest(coalesce(b.total, 0) - a.undrawn, 0) <> greatest(a.balance, 0)
  union all
  select e.user_id, format('entry %s without an account', e.id), null, null
  from billing.ledger_entries as e
  where not exists (select 1 from billing.accounts as a where a.user_id = e.user_id)
  union all
  select r.user_id, format('reservation %s without an account', r.id), null, null
  from billing.reservations as r
  where not exists (select 1 from billing.accounts as a where a.user_id = r.user_id)
  union all
  select c.user_id, format('entry %s: balance_after = running sum', c.id), c.running::bigint,
    c.balance_after
  from chain as c
  where c.balance_after <> c.running
$$;

comment on function billing.check_invariants() is
'One row per broken invariant (none when the books are sound): balances equal entry sums, '
'reserved equals pending reservations, buckets hold the positive balance, balance_after chains.';

revoke all on function billing.check_invariants() from public;

insert into billing.schema_migrations (version, name) values ('20261121000600', 'reservations');
