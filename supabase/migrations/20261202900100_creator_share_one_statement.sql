-- Migration: the creator's share of a spend is accrued in one statement.
--
-- Purpose: a deduct or a usage record naming a listing accrues its creator's share in the
-- spender's transaction (20261202800200_creator_earnings.sql). accrue_creator_share read the
-- listing, the commission and the token value by three queries and two function calls, then
-- inserted: bench, fsync off, one client, the share cost a deduct 139 us in the server of its
-- 239 us (a plain deduct: 76 us), 92 us of it outside any statement (plpgsql evaluating each
-- expression, and calling the two SQL functions, afresh in every transaction). Now one insert
-- reads the listing, its creator's commission (billing.creator_commission_bps' rule: the
-- creator's, else the platform's, else 20%) and the token value and computes the share,
-- floor(tokens x token value x (10000 - commission) / 10000) micro-cents; a second query runs
-- only when nothing was inserted, to refuse a listing that is not an agent as before. The same
-- entries, keys and errors. billing.creator_share_microcents, which only accrue called, goes.
-- Objects: redefines billing.accrue_creator_share(uuid, text, bigint, text, jsonb); drops
--   billing.creator_share_microcents(bigint, bigint, integer).

create or replace function billing.accrue_creator_share(
  p_user_id uuid,
  p_listing text,
  p_tokens bigint,
  p_idempotency_key text,
  p_metadata jsonb
) returns void
language plpgsql
set search_path = ''
as $$
begin
  insert into billing.creator_earnings (
    creator_id, kind, amount_microcents, idempotency_key, user_id, product_code, tokens, metadata
  )
  select
    p.creator_id, 'usage_share', x.amount, p_idempotency_key, p_user_id, p_listing, p_tokens,
    p_metadata || jsonb_build_object(
      'commission_bps', x.bps, 'token_value_microcents', s.creator_token_value_microcents)
  from billing.products as p
  cross join billing.settings as s
  left join billing.creators as c on c.user_id = p.creator_id
  cross join lateral (
    -- billing.creator_commission_bps, inline (a function call here would cost a plan a call).
    select coalesce(c.commission_bps, s.marketplace_commission_bps, 2000) as bps
  ) as b
  cross join lateral (
    -- Rounding: down, to the micro-cent (the platform keeps less than a millionth of a cent).
    select
      b.bps,
      floor(p_tokens::numeric * s.creator_token_value_microcents * (10000 - b.bps) / 10000)::bigint
        as amount
  ) as x
  where p.code = p_listing and p.kind = 'agent' and p_tokens > 0 and x.amount > 0
  on conflict (idempotency_key) do nothing;
  if not found and not exists (
    select from billing.products as p where p.code = p_listing and p.kind = 'agent'
  ) then
    raise exception using
      errcode = '22023',
      message = format('listing %s is not an agent of billing.products: nothing was charged',
        coalesce(quote_literal(p_listing), 'null'));
  end if;
end;
$$;

drop function billing.creator_share_microcents(bigint, bigint, integer);

insert into billing.schema_migrations (version, name) values ('20261202900100', 'creator_share_one_statement');
