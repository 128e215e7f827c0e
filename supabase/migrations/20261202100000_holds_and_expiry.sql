-- Migration: a pending hold keeps its tokens whatever their bucket's expiry; settling for 0.
--
-- Purpose: a hold whose bucket expired used to be charged twice (expiry took the whole bucket
-- remainder, then the settlement charged the hold again and drove the balance into debt). Now
-- expire_tokens expires only what no pending hold covers. Holds cover the account's tokens in
-- consumption order (soonest expiry first, the order a settlement charges them), so the part of
-- an expiring bucket a hold covers moves to accounts.held_expired instead of leaving: it stays in
-- the balance, still held. A settlement charges those tokens first; what its hold releases of
-- them (or a release, or the hold's own TTL) leaves then, as an expiry entry of its own keyed
-- expiry:held:<reservation id>. A settlement never drives the balance below zero, and it may be
-- for 0 (the call cost nothing): no entry, the hold released, status applied.
-- Objects: accounts.held_expired, billing.account_row_is_valid() (accounts_valid now calls it;
--   billing.account_is_valid() dropped), billing.reservation_is_valid() (settle_amount 0
--   allowed), billing.draw_buckets(), public.settle_reservation(), public.release_reservation(),
--   public.expire_tokens(). settle_reservations() and check_invariants() follow these rules in
--   20261202400300 and 20261202400100 (one definition per function in a release).
--
-- The tokens of an account: greatest(sum(buckets.remaining) - undrawn + held_expired, 0) =
-- greatest(balance, 0). held_expired never exceeds reserved (a CHECK). Debits that may create
-- debt (a refund's clawback, a lost dispute) do not know held_expired; they go to undrawn as any
-- debit, and the next draw takes from held_expired what the buckets could not give. Settle and
-- release, which do not draw, count held_expired as at most greatest(balance, 0) for the same
-- reason, moving the difference out of undrawn.
--
-- Lock order unchanged: settle, release and expiry resolve the reservation first, then lock the
-- account; expiry of buckets runs under the account lock (draw_buckets takes it).

alter table billing.accounts
add column held_expired bigint not null default 0;

-- The row rules stay in one function-backed CHECK (see billing.ledger_entry_is_valid: a CHECK's
-- text is parsed again by every statement that writes the table, and every debit writes this
-- one); the new rule joins them there instead of adding a CHECK of its own.
create function billing.account_row_is_valid(
  p_reserved bigint,
  p_undrawn bigint,
  p_held_expired bigint,
  p_subscription_status text
) returns boolean
language plpgsql immutable
set search_path = ''
as $$
begin
  return coalesce(
    p_reserved >= 0
    and p_undrawn >= 0
    and p_held_expired between 0 and p_reserved
    and p_subscription_status in (
      'none', 'incomplete', 'incomplete_expired', 'trialing', 'active', 'past_due', 'canceled',
      'unpaid', 'paused'
    ),
    false
  );
end;
$$;

comment on function billing.account_row_is_valid(bigint, bigint, bigint, text) is
'CHECK of billing.accounts: reserved and undrawn not negative, held_expired between 0 and '
'reserved, subscription_status one of Stripe''s subscription statuses or none.';

revoke all on function billing.account_row_is_valid(bigint, bigint, bigint, text) from public;

alter table billing.accounts
drop constraint accounts_valid,
add constraint accounts_valid check (
  billing.account_row_is_valid(reserved, undrawn, held_expired, subscription_status)
);

drop function billing.account_is_valid(bigint, bigint, text);

comment on column billing.accounts.held_expired is
'Tokens of pending holds whose bucket already expired: kept in the balance while held, '
'charged first by a settlement; what a hold releases of them leaves as an expiry entry. '
'0..reserved.';

create or replace function billing.reservation_is_valid(
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
      or (p_status = 'settled' and p_resolved_at is not null and p_settle_amount >= 0)
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
'consistent with its resolution (pending: unresolved; settled: resolved with a settle_amount '
'of 0 or more; released or expired: resolved without one).';

create or replace function billing.draw_buckets(p_user_id uuid) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_undrawn bigint;
  v_held_expired bigint;
  v_bucket_tokens bigint;
begin
  with drawn as (
    select a.user_id, a.undrawn, a.held_expired
    from billing.accounts as a
    where a.user_id = p_user_id
    -- The lock an update takes: `for update` would also wait for (and deadlock with) the key
    -- share lock a concurrent foreign-key check holds, e.g. a Stripe payment row being written.
    for no key update
  )

  update billing.accounts as a
  set undrawn = 0
  from drawn
  where a.user_id = drawn.user_id and drawn.undrawn > 0
  returning drawn.undrawn, drawn.held_expired into v_undrawn, v_held_expired;

  if v_undrawn > 0 then
    if v_held_expired > 0 then
      -- Usage never takes held tokens (available excludes them); only a debit that may create
      -- debt can take more than the buckets hold, and then it took held tokens too.
      select coalesce(sum(b.remaining), 0)::bigint into v_bucket_tokens
      from billing.credit_buckets as b
      where b.user_id = p_user_id and b.remaining > 0;
      if v_undrawn > v_bucket_tokens then
        update billing.accounts as a
        set held_expired = a.held_expired - least(a.held_expired, v_undrawn - v_bucket_tokens)
        where a.user_id = p_user_id;
      end if;
    end if;
    perform billing.consume_buckets(p_user_id, v_undrawn);
  end if;
end;
$$;

comment on function billing.draw_buckets(uuid) is
'Draws the account''s undrawn debits from its buckets (consumption order) and zeroes undrawn; '
'what the buckets cannot give comes out of held_expired. Locks the account; run before '
'anything adds, expires or reads buckets.';

create or replace function public.settle_reservation(
  p_reservation_id uuid,
  p_amount bigint
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_user_id uuid;
  v_charge bigint;
  v_expired bigint;
  v_balance bigint;
  v_entry_id bigint;
  v_first billing.reservations;
begin
  if p_amount is null or p_amount < 0 or p_amount > 1000000000000000 then
    raise exception using
      errcode = '22023',
      message = format('p_amount must be an integer from 0 to 10^15, got %s',
        coalesce(p_amount::text, 'null'));
  end if;

  -- One statement. Resolve the reservation first: that row lock is what makes it resolve
  -- exactly once. Then lock the account: up to the reserved amount the charge always
  -- succeeds; the excess comes from what is available besides this hold; never below zero.
  -- The charge takes the held tokens whose bucket expired first (held); of those, what the
  -- remaining holds do not cover expires (expired, its entry written below). Then the entry,
  -- unless the charge is 0.
  with resolved as (
    update billing.reservations as r
    set status = 'settled', settle_amount = p_amount, resolved_at = now()
    where r.id = p_reservation_id and r.status = 'pending'
    returning r.user_id, r.amount
  ),

  locked as (
    select
      a.user_id,
      a.balance,
      a.undrawn,
      a.held_expired,
      a.reserved - resolved.amount as reserved_after,
      least(
        p_amount, resolved.amount + greatest(a.balance - a.reserved, 0), greatest(a.balance, 0)
      ) as charge,
      least(a.held_expired, greatest(a.balance, 0)) as held
    from billing.accounts as a
    inner join resolved on a.user_id = resolved.user_id
    for no key update of a
  ),

  before as (
    select
      l.user_id,
      l.balance,
      l.undrawn,
      l.held_expired,
      l.reserved_after,
      l.charge,
      l.held,
      greatest(l.held - l.charge - l.reserved_after, 0) as expired
    from locked as l
  ),

  -- The new row is written from the row as locked, whole: mixing the update's own view of the
  -- row with the locked one showed, under concurrent expiry, two different versions.
  charged as (
    update billing.accounts as a
    set
      reserved = before.reserved_after,
      balance = before.balance - before.charge - before.expired,
      undrawn = before.undrawn - (before.held_expired - before.held)
      + greatest(before.charge - before.held, 0),
      held_expired = greatest(before.held - before.charge, 0) - before.expired,
      updated_at = now()
    from before
    where a.user_id = before.user_id
    returning a.user_id, a.balance, before.charge, before.expired
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, reservation_id, description
    )
    select
      charged.user_id, -charged.charge, charged.balance + charged.expired, 'usage',
      'reservation:' || p_reservation_id::text, p_reservation_id, 'Settled reservation'
    from charged
    where charged.charge > 0
    returning id
  )

  select charged.user_id, charged.charge, charged.expired, charged.balance, entry.id
  into v_user_id, v_charge, v_expired, v_balance, v_entry_id
  from charged
  left join entry on true;

  if v_user_id is null then
    select * into v_first from billing.reservations as r where r.id = p_reservation_id;
    if not found then
      raise exception using
        errcode = 'TBRES',
        message = format('reservation %s not found', coalesce(p_reservation_id::text, 'null'));
    end if;
    if v_first.status = 'settled' and v_first.settle_amount = p_amount then
      return query
      select 'duplicate'::text, coalesce(e.balance_after, a.balance), e.id
      from billing.accounts as a
      left join billing.ledger_entries as e
        on e.idempotency_key = 'reservation:' || p_reservation_id::text
      where a.user_id = v_first.user_id;
      return;
    end if;
    return query
    select 'not_pending'::text, a.balance, null::bigint
    from billing.accounts as a
    where a.user_id = v_first.user_id;
    return;
  end if;

  if v_expired > 0 then
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    values (
      v_user_id, -v_expired, v_balance, 'expiry', 'expiry:held:' || p_reservation_id::text,
      'Held tokens expired', jsonb_build_object('reservation_id', p_reservation_id)
    );
  end if;

  status := case when v_charge < p_amount then 'partial' else 'applied' end;
  balance := v_balance;
  entry_id := v_entry_id;
  return next;
end;
$$;

comment on function public.settle_reservation(uuid, bigint) is
'Charges the actual usage (0 or more) of a pending reservation and releases the rest of the '
'hold. Up to the reserved amount it always succeeds; above it the excess comes from available, '
'capped at zero, and never below a zero balance (status partial). 0 charges nothing (no entry). '
'Statuses: applied, partial, duplicate, not_pending. 22023 on a bad amount, TBRES if unknown.';

create or replace function public.release_reservation(
  p_reservation_id uuid
) returns table (status text, available bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_user_id uuid;
  v_expired bigint;
  v_balance bigint;
  v_available bigint;
  v_first billing.reservations;
begin
  -- One statement, as settle_reservation: resolve the reservation first (its row lock makes it
  -- resolve once), then lock the account and lift the hold. Of the held tokens whose bucket
  -- expired, what the remaining holds do not cover leaves now (its entry written below). The
  -- new row is written from the row as locked, whole.
  with resolved as (
    update billing.reservations as r
    set status = 'released', resolved_at = now()
    where r.id = p_reservation_id and r.status = 'pending'
    returning r.user_id, r.amount
  ),

  locked as (
    select
      a.user_id,
      a.balance,
      a.undrawn,
      a.held_expired,
      a.reserved - resolved.amount as reserved_after,
      least(a.held_expired, greatest(a.balance, 0)) as held
    from billing.accounts as a
    inner join resolved on a.user_id = resolved.user_id
    for no key update of a
  ),

  released as (
    update billing.accounts as a
    set
      reserved = l.reserved_after,
      balance = l.balance - greatest(l.held - l.reserved_after, 0),
      undrawn = l.undrawn - (l.held_expired - l.held),
      held_expired = l.held - greatest(l.held - l.reserved_after, 0),
      updated_at = now()
    from locked as l
    where a.user_id = l.user_id
    returning a.user_id, a.balance, a.balance - a.reserved as available,
      greatest(l.held - l.reserved_after, 0) as expired
  )

  select released.user_id, released.expired, released.balance, released.available
  into v_user_id, v_expired, v_balance, v_available
  from released;

  if v_user_id is null then
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

  if v_expired > 0 then
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    values (
      v_user_id, -v_expired, v_balance, 'expiry', 'expiry:held:' || p_reservation_id::text,
      'Held tokens expired', jsonb_build_object('reservation_id', p_reservation_id)
    );
  end if;

  status := 'applied';
  available := v_available;
  return next;
end;
$$;

comment on function public.release_reservation(uuid) is
'Lifts a pending hold without charging (held tokens whose bucket expired leave then, as an '
'expiry entry). Statuses: applied, duplicate (already released; returns the current '
'available), not_pending (settled or expired). TBRES if unknown.';

create or replace function public.expire_tokens(
  p_as_of timestamptz default now()
) returns table (expired_buckets bigint, expired_reservations bigint)
language plpgsql
-- Definer: run by pg_cron as the owner and by service_role, which cannot write billing tables.
security definer
set search_path = ''
as $$
declare
  v_reservations bigint := 0;
  v_buckets bigint := 0;
  v_holds record;
  v_user_id uuid;
  v_bucket record;
  v_cover bigint;
  v_held bigint;
  v_held_expired bigint;
  v_expired bigint;
  v_balance bigint;
begin
  if p_as_of is null then
    raise exception using errcode = '22023', message = 'p_as_of must not be null';
  end if;

  -- One run at a time: concurrent runs would lock the same accounts in different orders.
  perform pg_catalog.pg_advisory_xact_lock(pg_catalog.hashtext('token-billing:expire_tokens'));

  -- Reservations past their TTL: resolve each (its row lock), then per account, in user id
  -- order, lift the holds. Held tokens whose bucket expired and that no hold covers any more
  -- leave as an expiry entry, keyed by one of the expired reservations (each expires once).
  for v_holds in
    with expired as (
      update billing.reservations as r
      set status = 'expired', resolved_at = now()
      where r.status = 'pending' and r.expires_at <= p_as_of
      returning r.id, r.user_id, r.amount
    )

    select e.user_id, sum(e.amount)::bigint as total, count(*) as holds, max(e.id::text) as last_id
    from expired as e
    group by e.user_id
    order by e.user_id
  loop
    v_reservations := v_reservations + v_holds.holds;

    select
      least(a.held_expired, greatest(a.balance, 0)),
      greatest(least(a.held_expired, greatest(a.balance, 0)) - (a.reserved - v_holds.total), 0)
    into v_held_expired, v_expired
    from billing.accounts as a
    where a.user_id = v_holds.user_id
    for no key update;

    update billing.accounts as a
    set
      reserved = a.reserved - v_holds.total,
      balance = a.balance - v_expired,
      undrawn = a.undrawn - (a.held_expired - v_held_expired),
      held_expired = v_held_expired - v_expired,
      updated_at = now()
    where a.user_id = v_holds.user_id
    returning a.balance into v_balance;

    if v_expired > 0 then
      insert into billing.ledger_entries (
        user_id, amount, balance_after, kind, idempotency_key, description, metadata
      )
      values (
        v_holds.user_id, -v_expired, v_balance, 'expiry', 'expiry:held:' || v_holds.last_id,
        'Held tokens expired', jsonb_build_object('reservation_id', v_holds.last_id::uuid)
      );
    end if;
  end loop;

  -- Buckets: per user in id order, lock the account, then empty its expired buckets. Pending
  -- holds cover the account's tokens soonest expiry first (the order a settlement charges
  -- them): the part of an expired bucket they cover moves to held_expired, the rest leaves.
  for v_user_id in
    select distinct b.user_id
    from billing.credit_buckets as b
    where b.remaining > 0 and b.expires_at <= p_as_of
    order by b.user_id
  loop
    -- Lock the account and draw its undrawn debits first: they came out of these buckets.
    perform billing.draw_buckets(v_user_id);

    select a.reserved - a.held_expired into v_cover
    from billing.accounts as a
    where a.user_id = v_user_id;

    -- The account lock (taken above) is what serializes every change of its buckets.
    for v_bucket in
      select b.id, b.remaining
      from billing.credit_buckets as b
      where b.user_id = v_user_id and b.remaining > 0 and b.expires_at <= p_as_of
      order by b.expires_at asc, b.id asc
    loop
      v_held := least(v_bucket.remaining, v_cover);
      v_cover := v_cover - v_held;

      update billing.credit_buckets as b
      set remaining = 0, expired_at = now()
      where b.id = v_bucket.id;

      update billing.accounts as a
      set
        balance = a.balance - (v_bucket.remaining - v_held),
        held_expired = a.held_expired + v_held,
        updated_at = now()
      where a.user_id = v_user_id
      returning a.balance into v_balance;

      if v_bucket.remaining > v_held then
        insert into billing.ledger_entries (
          user_id, amount, balance_after, kind, idempotency_key, description, metadata
        )
        values (
          v_user_id, -(v_bucket.remaining - v_held), v_balance, 'expiry',
          'expiry:' || v_bucket.id::text, 'Tokens expired',
          jsonb_build_object('bucket_id', v_bucket.id)
        );
      end if;
      v_buckets := v_buckets + 1;
    end loop;
  end loop;

  return query select v_buckets, v_reservations;
end;
$$;

comment on function public.expire_tokens(timestamptz) is
'Expires pending reservations past their TTL, then the buckets expired at p_as_of: an expiry '
'entry for what no pending hold covers; the covered part stays held (accounts.held_expired) '
'and leaves when its hold resolves. Idempotent; returns how many buckets and holds it expired.';

insert into billing.schema_migrations (version, name) values ('20261202100000', 'holds_and_expiry');
