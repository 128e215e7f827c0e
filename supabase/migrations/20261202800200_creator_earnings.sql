-- Migration: the creator earnings ledger: the usage revenue share, debts and payouts.
--
-- Purpose: when a user spends tokens on a creator's agent, the creator earns
--   floor(tokens x creator_token_value_microcents x (10000 - commission_bps) / 10000)
-- micro-cents (millionths of a cent), one entry per spend: a usage record whose dimensions name
-- the listing ({"listing": "<agent code>"}, record_usage), or a deduct whose metadata does
-- (deduct_tokens(..., p_metadata => '{"listing": "<agent code>"}')). Accruing in micro-cents
-- keeps each entry's rounding below a millionth of a cent; a payout takes whole cents and the
-- fraction stays in the balance, so sums stay exact. The ledger is append-only; a creator's
-- balance is the sum of the creator's entries; each entry has a unique idempotency key (the
-- source it comes from: a usage record, a ledger entry, a refund, a payout).
--
-- Rules, in a sentence each:
--   * Share of a usage record: on the tokens it charged (a `partial` settlement charged less
--     than the items were priced at: its items earn in line order until the charge is used up).
--   * Refunded tokens: a clawback or dispute of a token purchase that leaves the buyer's
--     balance below zero means the buyer spent tokens that were paid back; that many tokens
--     (at most the clawback) of the buyer's most recent creator usage are reversed (kind
--     usage_share_reversed, the share's micro-cents pro rata, rounded down; the last tokens of a
--     share take its remainder, so a share is never reversed by more than it earned). A
--     reversal is final: a refund that fails later gives the buyer the tokens back, not the
--     creator the earnings.
--   * Never below zero without a debt entry: an entry that takes money (a reversal, a refund or
--     dispute the creator did not return through Stripe) takes at most the balance; the rest is
--     a separate entry of kind debt. Later earnings pay the debt before any payout.
-- Objects: billing.creator_earnings (+ append-only trigger), billing.creator_share_microcents(),
--   billing.take_creator_earnings(), billing.reverse_creator_shares(), the triggers
--   tg_usage_records__50_creator_share, tg_ledger_entries__50_creator_share,
--   tg_ledger_entries__51_creator_share_reversal, public.creator_statement(),
--   public.my_creator_earnings().
--
-- Hot path: deduct_tokens and record_usage are unchanged. The triggers' WHEN clauses test the
-- new row only (metadata ? 'listing', dimensions ? 'listing', kind and balance_after), so a
-- spend that names no listing runs no trigger function. A share entry locks nothing but the
-- foreign key's share lock on the creator row (the functions that take money lock the creator
-- `for no key update`, which does not conflict with it).
--
-- Lock order: the buyer's account (held by the ledger primitive that fired the trigger), then
-- creator rows in ascending user_id; a payout locks creator rows only, in the same order.

create table billing.creator_earnings (
  id bigint generated always as identity primary key,
  creator_id uuid not null references billing.creators (user_id),
  kind text not null,
  amount_microcents bigint not null,
  idempotency_key text not null,
  user_id uuid,
  product_code text,
  tokens bigint,
  reverses_id bigint references billing.creator_earnings (id),
  sale_id text,
  payout_id uuid,
  metadata jsonb not null default '{}',
  created_at timestamptz not null default now(),
  constraint creator_earnings_idempotency_key_unique unique (idempotency_key),
  constraint creator_earnings_sign check (
    (
      kind in ('usage_share', 'sale_refund_reversed', 'sale_dispute_reversed', 'payout_returned')
      and amount_microcents > 0
    )
    or (
      kind in ('usage_share_reversed', 'sale_refund', 'sale_dispute', 'payout', 'debt')
      and amount_microcents < 0
    )
  ),
  constraint creator_earnings_key_length check (length(idempotency_key) between 1 and 255),
  constraint creator_earnings_tokens_valid check (tokens is null or tokens >= 0),
  constraint creator_earnings_metadata_object check (jsonb_typeof(metadata) = 'object')
);

create index creator_earnings_creator_id_id_idx on billing.creator_earnings (creator_id, id);
create index creator_earnings_user_shares_idx on billing.creator_earnings (user_id, id)
where kind = 'usage_share';
create index creator_earnings_reverses_id_idx on billing.creator_earnings (reverses_id)
where reverses_id is not null;

comment on table billing.creator_earnings is
'Append-only ledger of what the platform owes each creator, in micro-cents (millionths of a '
'cent): a creator''s balance is the sum of the creator''s entries. Credits: usage_share, '
'sale_refund_reversed, sale_dispute_reversed, payout_returned; debits: usage_share_reversed, '
'sale_refund, sale_dispute, payout, and debt (the part of a debit beyond the balance).';
comment on column billing.creator_earnings.id is 'Entry id, in the order entries were written.';
comment on column billing.creator_earnings.creator_id is 'The creator whose balance it changes.';
comment on column billing.creator_earnings.kind is 'What moved the balance (see the table).';
comment on column billing.creator_earnings.amount_microcents is
'Signed micro-cents: credits positive, debits negative; 10^6 micro-cents are a cent.';
comment on column billing.creator_earnings.idempotency_key is
'Unique: the source of the entry (usage:<record>, ledger:<entry>, sale-refund:<refund>:n<k>, '
'payout:<payout>, ...), so a source moves the balance once.';
comment on column billing.creator_earnings.user_id is 'The user who spent the tokens (shares).';
comment on column billing.creator_earnings.product_code is 'The agent listing.';
comment on column billing.creator_earnings.tokens is 'Tokens the share (or reversal) is on.';
comment on column billing.creator_earnings.reverses_id is 'The usage_share a reversal takes back.';
comment on column billing.creator_earnings.sale_id is 'The marketplace sale (cs_...) of a refund or dispute.';
comment on column billing.creator_earnings.payout_id is 'The payout of a payout or payout_returned entry.';
comment on column billing.creator_earnings.metadata is
'Inputs of the computation (commission_bps, token value, the source''s ids).';
comment on column billing.creator_earnings.created_at is 'When the entry was written.';

create function billing.tg_creator_earnings__refuse_change() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = 'TBAPP',
    message = format('billing.creator_earnings is append-only: %s refused', tg_op);
end;
$$;

comment on function billing.tg_creator_earnings__refuse_change() is
'Trigger: refuses every update, delete and truncate of creator earnings, for every role.';

revoke all on function billing.tg_creator_earnings__refuse_change() from public;

create trigger tg_creator_earnings__10_refuse_change
before update or delete on billing.creator_earnings
for each row execute function billing.tg_creator_earnings__refuse_change();

create trigger tg_creator_earnings__11_refuse_truncate
before truncate on billing.creator_earnings
for each statement execute function billing.tg_creator_earnings__refuse_change();

alter table billing.creator_earnings enable row level security;

create policy creator_earnings_select_own on billing.creator_earnings
for select to authenticated
using (creator_id = (select auth.uid()));

revoke all on billing.creator_earnings from public, anon, authenticated, service_role;
grant select on billing.creator_earnings to authenticated, service_role;

-- Computing and taking -----------------------------------------------------------------------

create function billing.creator_share_microcents(
  p_tokens bigint,
  p_token_value_microcents bigint,
  p_commission_bps integer
) returns bigint
language sql immutable
set search_path = ''
as $$
  -- Rounding: down, to the micro-cent (the platform keeps less than a millionth of a cent).
  select floor(
    p_tokens::numeric * p_token_value_microcents * (10000 - p_commission_bps) / 10000
  )::bigint
$$;

comment on function billing.creator_share_microcents(bigint, bigint, integer) is
'A creator''s share of tokens spent: floor(tokens x token value in micro-cents x (10000 - '
'commission in basis points) / 10000), in micro-cents.';

revoke all on function billing.creator_share_microcents(bigint, bigint, integer) from public;

create function billing.take_creator_earnings(
  p_creator_id uuid,
  p_amount_microcents bigint,
  p_kind text,
  p_idempotency_key text,
  p_tokens bigint default null,
  p_reverses_id bigint default null,
  p_sale_id text default null,
  p_user_id uuid default null,
  p_product_code text default null,
  p_metadata jsonb default '{}'
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_balance bigint;
  v_taken bigint;
begin
  if p_amount_microcents <= 0 then
    return 0;
  end if;
  -- Serializes the debits of one creator (not its credits: no key update vs key share).
  perform 1 from billing.creators as c where c.user_id = p_creator_id for no key update;
  if exists (
    select 1 from billing.creator_earnings as e
    where e.idempotency_key in (p_idempotency_key, p_idempotency_key || ':debt')
  ) then
    return 0;
  end if;
  select coalesce(sum(e.amount_microcents), 0)::bigint into v_balance
  from billing.creator_earnings as e
  where e.creator_id = p_creator_id;

  v_taken := least(p_amount_microcents, greatest(v_balance, 0));
  if v_taken > 0 then
    insert into billing.creator_earnings (
      creator_id, kind, amount_microcents, idempotency_key, user_id, product_code, tokens,
      reverses_id, sale_id, metadata
    )
    values (
      p_creator_id, p_kind, -v_taken, p_idempotency_key, p_user_id, p_product_code, p_tokens,
      p_reverses_id, p_sale_id, p_metadata
    );
  end if;
  if v_taken < p_amount_microcents then
    -- Beyond the balance: a debt, an entry of its own, which later earnings pay back.
    insert into billing.creator_earnings (
      creator_id, kind, amount_microcents, idempotency_key, user_id, product_code, tokens,
      reverses_id, sale_id, metadata
    )
    values (
      p_creator_id, 'debt', v_taken - p_amount_microcents, p_idempotency_key || ':debt', p_user_id,
      p_product_code, case when v_taken = 0 then p_tokens else 0 end, p_reverses_id, p_sale_id,
      p_metadata || jsonb_build_object('debt_for', p_kind)
    );
  end if;
  return p_amount_microcents;
end;
$$;

comment on function billing.take_creator_earnings(
  uuid, bigint, text, text, bigint, bigint, text, uuid, text, jsonb
) is
'Debits a creator''s earnings once per key: an entry of p_kind for what the balance covers and '
'an entry of kind debt (key <key>:debt) for the rest, so only a debt entry takes the balance '
'below zero. Locks the creator row (no key update); returns the micro-cents taken now (0 when '
'the key was used).';

revoke all on function billing.take_creator_earnings(
  uuid, bigint, text, text, bigint, bigint, text, uuid, text, jsonb
) from public;

-- The usage revenue share --------------------------------------------------------------------

create function billing.accrue_creator_share(
  p_user_id uuid,
  p_listing text,
  p_tokens bigint,
  p_idempotency_key text,
  p_metadata jsonb
) returns void
language plpgsql
set search_path = ''
as $$
declare
  v_creator_id uuid;
  v_bps integer;
  v_value bigint;
  v_amount bigint;
begin
  select p.creator_id into v_creator_id
  from billing.products as p
  where p.code = p_listing and p.kind = 'agent';
  if v_creator_id is null then
    raise exception using
      errcode = '22023',
      message = format('listing %s is not an agent of billing.products: nothing was charged',
        coalesce(quote_literal(p_listing), 'null'));
  end if;
  if p_tokens <= 0 then
    return;
  end if;
  v_bps := billing.creator_commission_bps(v_creator_id);
  select s.creator_token_value_microcents into v_value from billing.settings as s;
  v_amount := billing.creator_share_microcents(p_tokens, v_value, v_bps);
  if v_amount <= 0 then
    return;
  end if;
  insert into billing.creator_earnings (
    creator_id, kind, amount_microcents, idempotency_key, user_id, product_code, tokens, metadata
  )
  values (
    v_creator_id, 'usage_share', v_amount, p_idempotency_key, p_user_id, p_listing, p_tokens,
    p_metadata || jsonb_build_object('commission_bps', v_bps, 'token_value_microcents', v_value)
  )
  on conflict (idempotency_key) do nothing;
end;
$$;

comment on function billing.accrue_creator_share(uuid, text, bigint, text, jsonb) is
'Credits the creator of an agent listing its share of tokens spent on it (kind usage_share, once '
'per key); 22023 when the listing is not an agent (the spend is refused with it).';

revoke all on function billing.accrue_creator_share(uuid, text, bigint, text, jsonb) from public;

create function billing.tg_usage_records__creator_share() returns trigger
language plpgsql
set search_path = ''
as $$
declare
  v_charged bigint;
  v_before bigint;
begin
  if new.entry_id is null then
    -- The call cost nothing (0 tokens, or a hold released): nothing earned.
    perform billing.accrue_creator_share(new.user_id, new.dimensions ->> 'listing', 0, '', '{}');
    return null;
  end if;
  -- What the call's ledger entry charged, less what the earlier items of the call took.
  select -e.amount into v_charged from billing.ledger_entries as e where e.id = new.entry_id;
  select coalesce(sum(r.tokens), 0)::bigint into v_before
  from billing.usage_records as r
  where r.idempotency_key = new.idempotency_key and r.line < new.line;
  perform billing.accrue_creator_share(
    new.user_id, new.dimensions ->> 'listing',
    least(new.tokens, greatest(coalesce(v_charged, 0) - v_before, 0)),
    'usage:' || new.id::text,
    jsonb_build_object('usage_record_id', new.id, 'ledger_entry_id', new.entry_id));
  return null;
end;
$$;

comment on function billing.tg_usage_records__creator_share() is
'Trigger: a usage record whose dimensions name a listing earns its creator the share of the '
'tokens it charged (key usage:<record id>).';

revoke all on function billing.tg_usage_records__creator_share() from public;

create trigger tg_usage_records__50_creator_share
after insert on billing.usage_records
for each row when (new.dimensions ? 'listing')
execute function billing.tg_usage_records__creator_share();

create function billing.tg_ledger_entries__creator_share() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  perform billing.accrue_creator_share(
    new.user_id, new.metadata ->> 'listing', -new.amount, 'ledger:' || new.id::text,
    jsonb_build_object('ledger_entry_id', new.id));
  return null;
end;
$$;

comment on function billing.tg_ledger_entries__creator_share() is
'Trigger: a usage debit (deduct_tokens) whose metadata names a listing earns its creator the '
'share of its tokens (key ledger:<entry id>).';

revoke all on function billing.tg_ledger_entries__creator_share() from public;

create trigger tg_ledger_entries__50_creator_share
after insert on billing.ledger_entries
for each row when (new.kind = 'usage' and new.metadata ? 'listing')
execute function billing.tg_ledger_entries__creator_share();

-- Refunded tokens --------------------------------------------------------------------------

create function billing.reverse_creator_shares(
  p_user_id uuid,
  p_tokens bigint,
  p_source text
) returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_left bigint := p_tokens;
  v_share record;
  v_take bigint;
  v_amount bigint;
begin
  if p_tokens <= 0 then
    return 0;
  end if;
  -- The creators whose shares may be reversed, locked in ascending order (no deadlocks).
  perform 1 from billing.creators as c
  where c.user_id in (
    select e.creator_id from billing.creator_earnings as e
    where e.user_id = p_user_id and e.kind = 'usage_share'
  )
  order by c.user_id
  for no key update;

  for v_share in
    select
      e.id, e.creator_id, e.product_code, e.tokens, e.amount_microcents,
      coalesce(r.tokens, 0)::bigint as reversed_tokens,
      coalesce(-r.amount, 0)::bigint as reversed_microcents
    from billing.creator_earnings as e
    left join lateral (
      select sum(x.tokens) as tokens, sum(x.amount_microcents) as amount
      from billing.creator_earnings as x
      where x.reverses_id = e.id
    ) as r on true
    where e.user_id = p_user_id and e.kind = 'usage_share'
      and e.tokens > coalesce(r.tokens, 0)
    order by e.id desc
  loop
    exit when v_left <= 0;
    v_take := least(v_left, v_share.tokens - v_share.reversed_tokens);
    -- Pro rata, rounded down; the share's last tokens take what is left of it.
    v_amount := case
      when v_take = v_share.tokens - v_share.reversed_tokens
        then v_share.amount_microcents - v_share.reversed_microcents
      else floor(v_share.amount_microcents::numeric * v_take / v_share.tokens)::bigint
    end;
    perform billing.take_creator_earnings(
      v_share.creator_id, v_amount, 'usage_share_reversed',
      format('usage-reversal:%s:%s', p_source, v_share.id), v_take, v_share.id, null, p_user_id,
      v_share.product_code, jsonb_build_object('source', p_source));
    v_left := v_left - v_take;
  end loop;
  return p_tokens - v_left;
end;
$$;

comment on function billing.reverse_creator_shares(uuid, bigint, text) is
'Reverses the creator shares of the user''s most recent creator usage, newest first, for up to '
'p_tokens tokens (kind usage_share_reversed, pro rata rounded down, debt beyond the balance), '
'once per source; returns the tokens reversed.';

revoke all on function billing.reverse_creator_shares(uuid, bigint, text) from public;

create function billing.tg_ledger_entries__creator_share_reversal() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  -- The tokens below zero after a clawback were spent before the purchase was paid back.
  perform billing.reverse_creator_shares(
    new.user_id, least(-new.amount, -new.balance_after), 'ledger:' || new.id::text);
  return null;
end;
$$;

comment on function billing.tg_ledger_entries__creator_share_reversal() is
'Trigger: a clawback or dispute debit that leaves the balance below zero reverses the creator '
'shares of that many of the user''s most recently spent tokens (at most the debit).';

revoke all on function billing.tg_ledger_entries__creator_share_reversal() from public;

create trigger tg_ledger_entries__51_creator_share_reversal
after insert on billing.ledger_entries
for each row when (new.kind in ('clawback', 'dispute') and new.balance_after < 0)
execute function billing.tg_ledger_entries__creator_share_reversal();

-- Reading ----------------------------------------------------------------------------------

create function public.creator_statement(
  p_creator_id uuid,
  p_as_of timestamptz default now()
) returns table (
  balance_microcents bigint,
  settled_microcents bigint,
  earned_microcents bigint,
  debt_microcents bigint,
  paid_out_cents bigint,
  entries bigint
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    coalesce(sum(e.amount_microcents), 0)::bigint,
    coalesce(sum(e.amount_microcents) filter (
      where e.amount_microcents < 0 or e.created_at <= p_as_of - s.creator_earnings_hold
    ), 0)::bigint,
    coalesce(sum(e.amount_microcents) filter (where e.kind = 'usage_share'), 0)::bigint,
    coalesce(-sum(e.amount_microcents) filter (where e.kind = 'debt'), 0)::bigint,
    (coalesce(-sum(e.amount_microcents) filter (where e.kind in ('payout', 'payout_returned')), 0)
      / 1000000)::bigint,
    count(e.id)
  from billing.settings as s
  left join billing.creator_earnings as e on e.creator_id = p_creator_id
  group by s.creator_earnings_hold
$$;

comment on function public.creator_statement(uuid, timestamptz) is
'A creator''s earnings as of p_as_of, in micro-cents: the balance (sum of entries), what is '
'settled (older than billing.settings.creator_earnings_hold; debits count at once), the usage '
'shares earned, the debt entries, and the cents paid out net of returns. Security invoker.';

revoke all on function public.creator_statement(uuid, timestamptz) from public, anon, authenticated;
grant execute on function public.creator_statement(uuid, timestamptz) to service_role;

create function public.my_creator_earnings()
returns table (
  id bigint,
  kind text,
  amount_microcents bigint,
  balance_microcents bigint,
  product_code text,
  tokens bigint,
  created_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    e.id, e.kind, e.amount_microcents,
    (sum(e.amount_microcents) over (order by e.id))::bigint,
    e.product_code, e.tokens, e.created_at
  from billing.creator_earnings as e
  where e.creator_id = (select auth.uid())
  order by e.id desc
$$;

comment on function public.my_creator_earnings() is
'The signed-in creator''s earnings entries, newest first, each with the balance after it (in '
'micro-cents: 10^6 a cent), read through RLS.';

revoke all on function public.my_creator_earnings() from public, anon, authenticated;
grant execute on function public.my_creator_earnings() to authenticated;

insert into billing.schema_migrations (version, name) values ('20261202800200', 'creator_earnings');
