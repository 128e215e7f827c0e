-- Migration: the creator's share is accrued by the writers of usage, not by ledger triggers.
--
-- Purpose: two AFTER INSERT triggers on billing.ledger_entries (20261202800200) accrued a
-- creator's share (a usage entry naming a listing) and reversed shares (a clawback or dispute
-- leaving the balance below zero). Their WHEN clauses skip the trigger function, but Postgres
-- prepares each WHEN expression again for every statement that inserts into the table, and
-- every entry paid for it: bench.ab, deduct_tokens with and without the triggers, 8 clients,
-- fsync off, 8 interleaved rounds of 3 s: 1.093x without (1.016-1.149, every round faster).
-- The writers that can write such an entry now call the same functions themselves, in the same
-- transaction, after the entry: public.deduct_tokens and public.deduct_tokens_batch (usage whose
-- metadata names a listing) and billing.debit (a plan's overage usage through
-- billing.debit_overage; clawbacks and disputes, which the Stripe handler writes through it).
-- No other writer writes usage with metadata (settle_reservation: none; record_usage: its
-- usage records name the listing, and their own trigger accrues) or a clawback or dispute.
-- The same entries, keys ('ledger:<entry id>'), amounts and errors (a listing that is not an
-- agent refuses the spend, 22023).
-- Objects: billing.accrue_entry_share() (the key and metadata of a ledger entry's share, in
--   one place); redefines public.deduct_tokens(), public.deduct_tokens_batch(), billing.debit();
--   drops the triggers tg_ledger_entries__50_creator_share and
--   tg_ledger_entries__51_creator_share_reversal and their functions.

drop trigger tg_ledger_entries__50_creator_share on billing.ledger_entries;
drop trigger tg_ledger_entries__51_creator_share_reversal on billing.ledger_entries;
drop function billing.tg_ledger_entries__creator_share();
drop function billing.tg_ledger_entries__creator_share_reversal();

create function billing.accrue_entry_share(
  p_user_id uuid,
  p_listing text,
  p_tokens bigint,
  p_entry_id bigint
) returns void
language plpgsql
set search_path = ''
as $$
begin
  perform billing.accrue_creator_share(
    p_user_id, p_listing, p_tokens, 'ledger:' || p_entry_id::text,
    jsonb_build_object('ledger_entry_id', p_entry_id));
end;
$$;

comment on function billing.accrue_entry_share(uuid, text, bigint, bigint) is
'The creator''s share of a usage ledger entry whose metadata names a listing (key '
'ledger:<entry id>, once per entry); called by the writers of such entries.';

revoke all on function billing.accrue_entry_share(uuid, text, bigint, bigint) from public;

create or replace function public.deduct_tokens(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_description text default null,
  p_metadata jsonb default '{}'
) returns table (status text, balance bigint, entry_id bigint, retry_after_ms integer)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_reserved bigint;
  v_levels bigint[];
  v_level bigint;
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or p_idempotency_key like 'signup:%' or p_idempotency_key like 'expiry:%'
    or p_idempotency_key like 'reservation:%' or p_idempotency_key like 'stripe:%'
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_caller_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- One statement: lock and debit the account (usage never takes available below zero here),
  -- then write the entry unless its key exists already.
  with debited as (
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = a.undrawn + p_amount, updated_at = now()
    where a.user_id = p_user_id and a.balance - a.reserved >= p_amount
    returning a.balance, a.reserved, a.alert_levels
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, -p_amount, debited.balance, 'usage', p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from debited
    on conflict (idempotency_key) do nothing
    returning id
  )

  select debited.balance, debited.reserved, debited.alert_levels, entry.id
  into balance, v_reserved, v_levels, entry_id
  from debited
  left join entry on true;

  if entry_id is not null then
    status := 'applied';
    if p_metadata ? 'listing' then
      -- Spent on an agent listing: its creator's share, in this transaction.
      perform billing.accrue_entry_share(p_user_id, p_metadata ->> 'listing', p_amount, entry_id);
    end if;
    if v_levels is not null then
      -- A threshold crossed (available fell to or below a level): notifications, a top-up.
      foreach v_level in array v_levels loop
        if balance - v_reserved <= v_level and balance - v_reserved + p_amount > v_level then
          perform billing.note_crossings(p_user_id, balance - v_reserved + p_amount, balance - v_reserved);
          exit;
        end if;
      end loop;
    end if;
    return next;
    return;
  end if;
  return query select * from billing.debit_overage(
    p_user_id, p_amount, p_idempotency_key, p_description, p_metadata, balance is not null);
end;
$$;

create or replace function billing.debit(
  p_user_id uuid,
  p_amount bigint,
  p_idempotency_key text,
  p_kind text,
  p_description text default null,
  p_metadata jsonb default '{}',
  p_allow_debt boolean default false
) returns table (status text, balance bigint, entry_id bigint)
language plpgsql
set search_path = ''
as $$
begin
  if p_amount is null or p_amount <= 0 or p_amount > 1000000000000000
    or p_idempotency_key is null or length(p_idempotency_key) > 255
    or length(btrim(p_idempotency_key)) = 0
    or (p_metadata is not null and jsonb_typeof(p_metadata) <> 'object') then
    perform billing.require_amount('p_amount', p_amount);
    perform billing.require_key('p_idempotency_key', p_idempotency_key);
    perform billing.require_object('p_metadata', p_metadata);
  end if;

  -- public.deduct_tokens's statement, with the kind and the debt rule of the caller.
  with debited as (
    update billing.accounts as a
    set balance = a.balance - p_amount, undrawn = a.undrawn + p_amount, updated_at = now()
    where a.user_id = p_user_id
      and (p_allow_debt or a.balance - a.reserved >= p_amount)
    returning a.balance
  ),

  entry as (
    insert into billing.ledger_entries (
      user_id, amount, balance_after, kind, idempotency_key, description, metadata
    )
    select
      p_user_id, -p_amount, debited.balance, p_kind, p_idempotency_key, p_description,
      coalesce(p_metadata, '{}')
    from debited
    on conflict (idempotency_key) do nothing
    returning id
  )

  select debited.balance, entry.id
  into balance, entry_id
  from debited
  left join entry on true;

  if entry_id is not null then
    status := 'applied';
    if p_kind = 'usage' and p_metadata ? 'listing' then
      -- Spent on an agent listing (a plan's overage, billing.debit_overage): the creator's share.
      perform billing.accrue_entry_share(p_user_id, p_metadata ->> 'listing', p_amount, entry_id);
    elsif p_kind in ('clawback', 'dispute') and balance < 0 then
      -- The tokens below zero after a clawback were spent before the purchase was paid back:
      -- the creator shares they earned are reversed.
      perform billing.reverse_creator_shares(
        p_user_id, least(p_amount, -balance), 'ledger:' || entry_id::text);
    end if;
    return next;
    return;
  end if;
  return query select * from billing.debit_refused(
    p_user_id, p_amount, p_idempotency_key, p_kind, balance is not null);
end;
$$;

create or replace function public.deduct_tokens_batch(p_items jsonb)
returns table (item integer, status text, balance bigint, entry_id bigint)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_bad record;
  v_item record;
  v_user_id uuid;
  v_expected bigint;
  v_inserted bigint;
  v_covered uuid[];
  v_items integer[];
  v_balances bigint[];
  v_entries bigint[];
begin
  if p_items is null or jsonb_typeof(p_items) <> 'array' then
    raise exception using
      errcode = '22023',
      message = format(
        'p_items must be a JSON array of {"user_id", "amount", "idempotency_key"} objects, '
        'got %s', coalesce(jsonb_typeof(p_items), 'null'));
  end if;
  if jsonb_array_length(p_items) > 1000 then
    raise exception using
      errcode = '22023',
      message = format('p_items takes at most 1000 items, got %s', jsonb_array_length(p_items));
  end if;

  -- Every item is checked before any is applied: the first bad one names its position and why.
  select i.position - 1 as idx, i.item, r.reason
  into v_bad
  from jsonb_array_elements(p_items) with ordinality as i (item, position)
  cross join lateral (
    select case
      when jsonb_typeof(i.item) <> 'object' then 'must be a JSON object'
      when i.item - array['user_id', 'amount', 'idempotency_key', 'description', 'metadata']
        <> '{}'::jsonb then
        'takes only user_id, amount, idempotency_key, description and metadata'
      when jsonb_typeof(i.item -> 'user_id') is distinct from 'string'
        or (i.item ->> 'user_id')
        !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
        'user_id must be a uuid'
      when jsonb_typeof(i.item -> 'amount') is distinct from 'number'
        or (i.item -> 'amount')::numeric not between 1 and 1000000000000000
        or (i.item -> 'amount')::numeric <> trunc((i.item -> 'amount')::numeric) then
        'amount must be a positive integer of at most 10^15'
      when jsonb_typeof(i.item -> 'idempotency_key') is distinct from 'string'
        or length(i.item ->> 'idempotency_key') > 255
        or length(btrim(i.item ->> 'idempotency_key')) = 0 then
        'idempotency_key must be a non-empty text of at most 255 characters'
      when (i.item ->> 'idempotency_key') like 'signup:%'
        or (i.item ->> 'idempotency_key') like 'expiry:%'
        or (i.item ->> 'idempotency_key') like 'reservation:%'
        or (i.item ->> 'idempotency_key') like 'stripe:%' then
        'idempotency_key must not start with signup:, expiry:, reservation: or stripe: '
        '(token-billing''s own keys)'
      when coalesce(jsonb_typeof(i.item -> 'description'), 'null') not in ('string', 'null') then
        'description must be a text or null'
      when coalesce(jsonb_typeof(i.item -> 'metadata'), 'null') not in ('object', 'null') then
        'metadata must be a JSON object or null'
    end as reason
  ) as r
  where r.reason is not null
  order by i.position
  limit 1;
  if found then
    raise exception using
      errcode = '22023',
      message = format('p_items[%s] %s, got %s', v_bad.idx, v_bad.reason, left(v_bad.item::text, 200));
  end if;

  begin
    with items as (
      select
        (i.position - 1)::integer as idx,
        (i.item ->> 'user_id')::uuid as user_id,
        (i.item ->> 'amount')::bigint as amount,
        i.item ->> 'idempotency_key' as idempotency_key,
        i.item ->> 'description' as description,
        coalesce(nullif(i.item -> 'metadata', 'null'::jsonb), '{}'::jsonb) as metadata
      from jsonb_array_elements(p_items) with ordinality as i (item, position)
    ),

    totals as (
      select t.user_id, sum(t.amount)::bigint as total
      from items as t
      group by t.user_id
    ),

    -- Every account of the batch, locked in ascending user_id order before any is changed.
    locked as (
      select a.user_id, t.total
      from billing.accounts as a
      inner join totals as t on a.user_id = t.user_id
      order by a.user_id
      for no key update of a
    ),

    debited as (
      update billing.accounts as a
      set balance = a.balance - l.total, undrawn = a.undrawn + l.total, updated_at = now()
      from locked as l
      where a.user_id = l.user_id and a.balance - a.reserved >= l.total
      returning a.user_id, a.balance + l.total as balance_before
    ),

    entries as (
      insert into billing.ledger_entries (
        user_id, amount, balance_after, kind, idempotency_key, description, metadata
      )
      select
        t.user_id, -t.amount,
        d.balance_before - sum(t.amount) over (partition by t.user_id order by t.idx),
        'usage', t.idempotency_key, t.description, t.metadata
      from items as t
      inner join debited as d on t.user_id = d.user_id
      order by t.user_id, t.idx
      returning ledger_entries.id, ledger_entries.user_id, ledger_entries.idempotency_key,
        ledger_entries.balance_after
    )

    select
      (select count(*) from items as t inner join debited as d on t.user_id = d.user_id),
      (select count(*) from entries),
      (select array_agg(d.user_id) from debited as d),
      array_agg(t.idx order by t.idx),
      array_agg(e.balance_after order by t.idx),
      array_agg(e.id order by t.idx)
    into v_expected, v_inserted, v_covered, v_items, v_balances, v_entries
    from entries as e
    inner join items as t
      on e.user_id = t.user_id and e.idempotency_key = t.idempotency_key;

    if v_inserted <> v_expected then
      -- Not every item of a covered account was written: undo, and run them one by one below.
      raise exception using errcode = 'TBRTY';
    end if;
  exception when sqlstate 'TBRTY' or unique_violation then
    v_covered := null;
    v_items := null;
  end;

  if v_items is not null then
    if p_items @? '$[*].metadata.listing' then
      -- Items spent on an agent listing: each creator's share, in entry order.
      perform billing.accrue_entry_share(e.user_id, e.metadata ->> 'listing', -e.amount, e.id)
      from billing.ledger_entries as e
      where e.id = any(v_entries) and e.metadata ? 'listing'
      order by e.id;
    end if;
    return query
    select u.idx, 'applied'::text, u.balance_after, u.entry_id
    from unnest(v_items, v_balances, v_entries) as u (idx, balance_after, entry_id);
  end if;

  for v_item in
    select
      (i.position - 1)::integer as idx,
      (i.item ->> 'user_id')::uuid as user_id,
      (i.item ->> 'amount')::bigint as amount,
      i.item ->> 'idempotency_key' as idempotency_key,
      i.item ->> 'description' as description,
      coalesce(nullif(i.item -> 'metadata', 'null'::jsonb), '{}'::jsonb) as metadata
    from jsonb_array_elements(p_items) with ordinality as i (item, position)
    where v_covered is null or (i.item ->> 'user_id')::uuid <> all(v_covered)
    order by 2, i.position
  loop
    v_user_id := v_item.user_id;

    -- public.deduct_tokens's statement.
    with debited as (
      update billing.accounts as a
      set balance = a.balance - v_item.amount, undrawn = a.undrawn + v_item.amount,
        updated_at = now()
      where a.user_id = v_user_id and a.balance - a.reserved >= v_item.amount
      returning a.balance
    ),

    entry as (
      insert into billing.ledger_entries (
        user_id, amount, balance_after, kind, idempotency_key, description, metadata
      )
      select
        v_user_id, -v_item.amount, debited.balance, 'usage', v_item.idempotency_key,
        v_item.description, v_item.metadata
      from debited
      on conflict (idempotency_key) do nothing
      returning id
    )

    select debited.balance, entry.id
    into balance, entry_id
    from debited
    left join entry on true;

    item := v_item.idx;
    if entry_id is not null then
      status := 'applied';
      if v_item.metadata ? 'listing' then
        perform billing.accrue_entry_share(
          v_user_id, v_item.metadata ->> 'listing', v_item.amount, entry_id);
      end if;
      return next;
    else
      select refused.status, refused.balance, refused.entry_id
      into status, balance, entry_id
      from billing.debit_refused(
        v_user_id, v_item.amount, v_item.idempotency_key, 'usage', balance is not null
      ) as refused;
      return next;
    end if;
  end loop;
end;
$$;

insert into billing.schema_migrations (version, name) values ('20261202900300', 'creator_share_by_writers');
