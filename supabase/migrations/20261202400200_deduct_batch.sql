-- Migration: many debits in one call.
--
-- Purpose: an agent backend charges many small calls. One round trip and one commit for up to
-- 1,000 debits instead of one each (the client's opt-in coalescer, token_billing.coalescer,
-- gathers concurrent deduct calls into these batches). Each item is exactly
-- public.deduct_tokens: the same statuses, the same idempotency rule, the same statement. The
-- batch is one transaction: a malformed item refuses it whole (22023, naming the item) and
-- changes nothing; so does a key reused with other arguments (TBKEY), an item's own error.
-- Objects: public.deduct_tokens_batch().
--
-- How: the items are checked first (a malformed one refuses the batch before anything is
-- written). The common case is then one statement for the whole batch: it locks every account
-- of the batch in ascending user_id order (the lock order of 20261202400100_fast_ledger.sql),
-- debits each account whose available tokens cover all of its items once by their sum, and
-- inserts the items' entries in item order with their running balance_after: a plain insert,
-- without the speculative insertion of `on conflict` on every row. Should any of those keys
-- exist already (a retried item, a key given twice), the unique index refuses the statement,
-- which is rolled back, and every item runs one by one as deduct_tokens would. Items of the
-- other accounts (funds that do not cover the sum, no account) always run one by one, in
-- ascending user_id and item order, so each gets exactly the status deduct_tokens would give
-- it at that point.

create function public.deduct_tokens_batch(p_items jsonb)
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

comment on function public.deduct_tokens_batch(jsonb) is
'Charges many usages in one transaction: p_items is a JSON array (at most 1000) of {"user_id": '
'uuid, "amount": positive integer, "idempotency_key": text, "description": text or null, '
'"metadata": object or null}. Each item is deduct_tokens (statuses applied, duplicate, '
'insufficient_funds, unknown_account); one row per item, named by its 0-based position (in no '
'particular order). 22023 for a malformed item and TBKEY for a reused key refuse the whole batch.';

revoke all on function public.deduct_tokens_batch(jsonb) from public, anon, authenticated;
grant execute on function public.deduct_tokens_batch(jsonb) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202400200', 'deduct_batch');
