-- Migration: holds for long work, and retries that cannot run the work twice for free.
--
-- Purpose: work that outlives its hold's TTL (a long agent run, a slow stream reader) keeps the
-- hold alive with extend_reservation (the client heartbeats it). Reserving again with the key of
-- an existing hold answers duplicate with that hold's id, pending or not (the contract's
-- statuses); get_reservation tells whether it is still pending and, if it resolved, its outcome
-- (what was charged, by which entry), so a retried request is not served a second time as if it
-- held tokens (the client raises HoldResolved).
-- Objects: reservations.first_expires_at, billing.tg_reservations__guard_change() (a pending
--   hold may move its expiry later), public.extend_reservation(), public.reserve_tokens()
--   (the TTL a retry is compared with), public.get_reservation().
--
-- Lock order: extend_reservation locks the reservation row only, so it adds no order.

alter table billing.reservations
add column first_expires_at timestamptz;

comment on column billing.reservations.first_expires_at is
'The expiry reserve_tokens set, once extend_reservation moved expires_at; null until then. '
'A retried reserve_tokens compares its TTL with first_expires_at - created_at.';

comment on column billing.reservations.expires_at is
'After this, expire_tokens releases the hold (status expired); extend_reservation moves it '
'later while the hold is pending.';

create or replace function billing.tg_reservations__guard_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if tg_op = 'UPDATE'
    and old.status = 'pending'
    and new.status <> 'pending'
    and (new.id, new.user_id, new.amount, new.idempotency_key, new.available_after,
      new.expires_at, new.created_at, new.first_expires_at)
    is not distinct from (old.id, old.user_id, old.amount, old.idempotency_key,
      old.available_after, old.expires_at, old.created_at, old.first_expires_at) then
    return new;
  end if;
  -- An extension: a pending hold's expiry moves later, the first expiry kept.
  if tg_op = 'UPDATE'
    and old.status = 'pending'
    and new.status = 'pending'
    and new.expires_at > old.expires_at
    and new.first_expires_at is not distinct from coalesce(old.first_expires_at, old.expires_at)
    and (new.id, new.user_id, new.amount, new.idempotency_key, new.available_after,
      new.created_at, new.settle_amount, new.resolved_at)
    is not distinct from (old.id, old.user_id, old.amount, old.idempotency_key,
      old.available_after, old.created_at, old.settle_amount, old.resolved_at) then
    return new;
  end if;
  raise exception using
    errcode = 'TBAPP',
    message = format('reservation %s cannot be changed: %s of a %s reservation refused',
      old.id, tg_op, old.status),
    hint = 'A reservation leaves pending once, through settle, release or expiry; while pending '
      'only extend_reservation moves its expiry later.';
end;
$$;

comment on function billing.tg_reservations__guard_change() is
'Trigger: a reservation accepts leaving pending once, and while pending an expiry moved later '
'(the first one kept in first_expires_at); every other change and every delete is refused.';

create function public.extend_reservation(
  p_reservation_id uuid,
  p_ttl interval
) returns table (status text, expires_at timestamptz)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_first billing.reservations;
begin
  if p_ttl is null or p_ttl <= interval '0' or p_ttl > interval '7 days' then
    raise exception using
      errcode = '22023',
      message = format('p_ttl must be between 0 and 7 days, got %s', coalesce(p_ttl::text, 'null'));
  end if;

  return query
  update billing.reservations as r
  set expires_at = now() + p_ttl, first_expires_at = coalesce(r.first_expires_at, r.expires_at)
  where r.id = p_reservation_id and r.status = 'pending' and r.expires_at < now() + p_ttl
  returning 'applied'::text, r.expires_at;
  if found then
    return;
  end if;

  select * into v_first from billing.reservations as r where r.id = p_reservation_id;
  if not found then
    raise exception using
      errcode = 'TBRES',
      message = format('reservation %s not found', coalesce(p_reservation_id::text, 'null'));
  end if;
  return query select
    case when v_first.status = 'pending' then 'duplicate' else 'not_pending' end,
    v_first.expires_at;
end;
$$;

comment on function public.extend_reservation(uuid, interval) is
'Moves a pending hold''s expiry to now() + p_ttl (at most 7 days) for work that outlives it. '
'Statuses: applied, duplicate (the new expiry would not be later; nothing changed), '
'not_pending (settled, released or expired). 22023 on a bad TTL, TBRES if unknown.';

revoke all on function public.extend_reservation(uuid, interval) from public, anon, authenticated;
grant execute on function public.extend_reservation(uuid, interval) to service_role;

create or replace function public.reserve_tokens(
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
      or coalesce(v_first.first_expires_at, v_first.expires_at) - v_first.created_at <> p_ttl then
      raise exception using
        errcode = 'TBKEY',
        message = format(
          'idempotency key %L was already used with different arguments (reservation %s)',
          p_idempotency_key, v_first.id);
    end if;
    -- The key's hold, pending or resolved (get_reservation tells which: a retried request must
    -- not run again as if it held tokens when its hold resolved).
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
'Statuses: applied, duplicate (the key''s hold, with its id, pending or already resolved: '
'get_reservation tells which and the outcome), insufficient_funds, unknown_account. 22023 on '
'invalid arguments, TBKEY on a key reused with another user, amount or TTL.';

create function public.get_reservation(
  p_reservation_id uuid
) returns table (
  status text,
  user_id uuid,
  amount bigint,
  expires_at timestamptz,
  settle_amount bigint,
  charged bigint,
  entry_id bigint,
  resolved_at timestamptz
)
language sql stable
set search_path = ''
as $$
  select
    r.status, r.user_id, r.amount, r.expires_at, r.settle_amount,
    case when r.status = 'settled' then coalesce(-e.amount, 0) end, e.id, r.resolved_at
  from billing.reservations as r
  left join billing.ledger_entries as e
    on e.idempotency_key = 'reservation:' || r.id::text
  where r.id = p_reservation_id
$$;

comment on function public.get_reservation(uuid) is
'One hold and its outcome: status, amount held, expiry, the amount settle was asked for, the '
'tokens actually charged (settled only) and that entry. No row if unknown.';

revoke all on function public.get_reservation(uuid) from public, anon, authenticated;
grant execute on function public.get_reservation(uuid) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202100100', 'extend_reservation');
