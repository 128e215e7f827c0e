-- Migration: creators, the sellers of the marketplace (Stripe Connect Express accounts).
--
-- Purpose: a creator is a user who sells agents on the platform. The service creates the
-- creator's Stripe Express account once (POST /v1/creators/onboard) and records it here with
-- register_creator; from then on account.updated keeps charges_enabled, payouts_enabled,
-- details_submitted and the requirements as Stripe last said (by Stripe's created: an older
-- event is stale), and account.application.deauthorized ends the connection. The platform's
-- commission is a setting in basis points (default 2000 = 20%), with a per-creator override.
-- Objects: billing.settings.marketplace_commission_bps, .creator_token_value_microcents,
--   .creator_payout_minimum_cents, .creator_earnings_hold, billing.creators,
--   billing.creator_commission_bps(), billing.apply_account_event(), public.register_creator(),
--   public.get_creator(), public.my_creator().
--
-- Money: every amount is an integer in the currency's minor unit (cents), or in micro-cents
-- (millionths of a cent) where a fraction of a cent must carry over (the creator earnings
-- ledger, 20261202800300_creator_earnings.sql). Commission rates are basis points (1/10000).

alter table billing.settings
add column marketplace_commission_bps integer not null default 2000,
add column creator_token_value_microcents bigint not null default 3333333,
add column creator_payout_minimum_cents bigint not null default 1000,
add column creator_earnings_hold interval not null default '7 days',
add constraint settings_marketplace_commission_valid check (marketplace_commission_bps between 0 and 10000),
add constraint settings_creator_token_value_valid check (
  creator_token_value_microcents between 1 and 1000000000000
),
add constraint settings_creator_payout_minimum_valid check (creator_payout_minimum_cents >= 1),
add constraint settings_creator_earnings_hold_valid check (creator_earnings_hold >= interval '0');

comment on column billing.settings.marketplace_commission_bps is
'The platform''s commission on creators'' sales and token revenue share, in basis points (2000 = '
'20%); billing.creators.commission_bps overrides it per creator.';
comment on column billing.settings.creator_token_value_microcents is
'What one token spent on a creator''s agent is worth, in millionths of a cent, before the '
'commission (default 3333333: $20 / 600 tokens, the seed''s cheapest tokens, rounded down).';
comment on column billing.settings.creator_payout_minimum_cents is
'A creator is paid out only when the settled earnings reach this many cents (default $10).';
comment on column billing.settings.creator_earnings_hold is
'How long earnings wait before a payout may pay them (refunds and disputes of the tokens come '
'first); default 7 days.';

create table billing.creators (
  user_id uuid primary key references billing.accounts (user_id),
  stripe_account_id text not null unique,
  charges_enabled boolean not null default false,
  payouts_enabled boolean not null default false,
  details_submitted boolean not null default false,
  requirements jsonb not null default '{}',
  commission_bps integer,
  deauthorized_at timestamptz,
  account_event_created timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint creators_stripe_account_format check (stripe_account_id ~ '^acct_[A-Za-z0-9]{1,250}$'),
  constraint creators_commission_valid check (commission_bps between 0 and 10000),
  constraint creators_requirements_object check (jsonb_typeof(requirements) = 'object')
);

comment on table billing.creators is
'Users who sell agents, one Stripe Connect Express account each (never another one). The Stripe '
'state is what the last account.updated said; only a creator with charges_enabled (and not '
'deauthorized) can list an agent or sell one.';
comment on column billing.creators.user_id is 'The creator (auth.users.id).';
comment on column billing.creators.stripe_account_id is 'The connected account, acct_...';
comment on column billing.creators.charges_enabled is 'Stripe: the account can take charges.';
comment on column billing.creators.payouts_enabled is 'Stripe: the account can be paid out.';
comment on column billing.creators.details_submitted is
'Stripe: onboarding was submitted (the Express dashboard login link needs it).';
comment on column billing.creators.requirements is
'Stripe''s requirements object of the last account.updated (currently_due, disabled_reason, ...).';
comment on column billing.creators.commission_bps is
'This creator''s commission in basis points; null: the platform''s '
'(billing.settings.marketplace_commission_bps). Set it as the owner with an update.';
comment on column billing.creators.deauthorized_at is
'When account.application.deauthorized said the account left the platform: no more sales or payouts.';
comment on column billing.creators.account_event_created is
'Stripe''s created time of the last account event applied: an older one is stale.';
comment on column billing.creators.created_at is 'When the creator was registered.';
comment on column billing.creators.updated_at is 'When the row last changed.';

alter table billing.creators enable row level security;

create policy creators_select_own on billing.creators
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.creators from public, anon, authenticated, service_role;
grant select on billing.creators to authenticated, service_role;

create function billing.creator_commission_bps(p_creator_id uuid) returns integer
language sql stable
set search_path = ''
as $$
  select coalesce(
    (select c.commission_bps from billing.creators as c where c.user_id = p_creator_id),
    (select s.marketplace_commission_bps from billing.settings as s),
    2000
  )
$$;

comment on function billing.creator_commission_bps(uuid) is
'The commission the platform takes from this creator, in basis points: the creator''s override, '
'else the platform default.';

revoke all on function billing.creator_commission_bps(uuid) from public;

create function public.register_creator(
  p_user_id uuid,
  p_stripe_account_id text
) returns table (status text, stripe_account_id text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_existing billing.creators;
begin
  if p_user_id is null then
    raise exception using errcode = '22023', message = 'p_user_id must not be null';
  end if;
  if p_stripe_account_id is null or p_stripe_account_id !~ '^acct_[A-Za-z0-9]{1,250}$' then
    raise exception using
      errcode = '22023',
      message = format('p_stripe_account_id must be a Stripe account id (acct_...), got %s',
        coalesce(quote_literal(p_stripe_account_id), 'null'));
  end if;
  perform billing.ensure_account(p_user_id);

  insert into billing.creators as c (user_id, stripe_account_id)
  values (p_user_id, p_stripe_account_id)
  on conflict do nothing;
  if found then
    return query select 'applied'::text, p_stripe_account_id;
    return;
  end if;

  select c.* into v_existing from billing.creators as c
  where c.user_id = p_user_id or c.stripe_account_id = p_stripe_account_id
  order by c.user_id = p_user_id desc
  limit 1;
  if v_existing.user_id = p_user_id and v_existing.stripe_account_id = p_stripe_account_id then
    return query select 'duplicate'::text, p_stripe_account_id;
    return;
  end if;
  raise exception using
    errcode = 'TBCRE',
    message = case when v_existing.user_id = p_user_id
      then format('user %s is already the creator of Stripe account %s, not %s', p_user_id,
        v_existing.stripe_account_id, p_stripe_account_id)
      else format('Stripe account %s belongs to creator %s, not %s', p_stripe_account_id,
        v_existing.user_id, p_user_id)
    end,
    hint = 'A creator has one connected account for good.';
end;
$$;

comment on function public.register_creator(uuid, text) is
'Records the Stripe Express account the service created for a user (opening the user''s account '
'if missing). Statuses: applied, duplicate (the same pair again). 22023 on invalid arguments; '
'TBCRE when the user has another account or the account belongs to another user.';

revoke all on function public.register_creator(uuid, text) from public, anon, authenticated;
grant execute on function public.register_creator(uuid, text) to service_role;

create function public.get_creator(p_user_id uuid)
returns table (
  stripe_account_id text,
  charges_enabled boolean,
  payouts_enabled boolean,
  details_submitted boolean,
  requirements jsonb,
  commission_bps integer,
  deauthorized_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    c.stripe_account_id, c.charges_enabled, c.payouts_enabled, c.details_submitted,
    c.requirements, coalesce(c.commission_bps, s.marketplace_commission_bps), c.deauthorized_at
  from billing.creators as c
  cross join billing.settings as s
  where c.user_id = p_user_id
$$;

comment on function public.get_creator(uuid) is
'The creator''s connected account and its Stripe state, with the effective commission in basis '
'points; no row for a user who is not a creator. Security invoker: service_role reads '
'billing.creators itself.';

revoke all on function public.get_creator(uuid) from public, anon, authenticated;
grant execute on function public.get_creator(uuid) to service_role;

create function public.my_creator()
returns table (
  stripe_account_id text,
  charges_enabled boolean,
  payouts_enabled boolean,
  details_submitted boolean,
  commission_bps integer,
  deauthorized_at timestamptz
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    c.stripe_account_id, c.charges_enabled, c.payouts_enabled, c.details_submitted,
    c.commission_bps, c.deauthorized_at
  from billing.creators as c
  where c.user_id = (select auth.uid())
$$;

comment on function public.my_creator() is
'The signed-in user''s creator account, read through RLS (no row for a user who is not a '
'creator). commission_bps is the creator''s own rate in basis points, null for the platform''s.';

revoke all on function public.my_creator() from public, anon, authenticated;
grant execute on function public.my_creator() to authenticated;

-- account.updated, account.application.deauthorized --------------------------------------------

create function billing.apply_account_event(p_event jsonb)
returns table (status text, detail text)
language plpgsql
set search_path = ''
as $$
declare
  v_type text := p_event ->> 'type';
  v_created timestamptz := to_timestamp(billing.stripe_bigint(p_event -> 'created', 'created'));
  v_object jsonb := p_event #> '{data,object}';
  v_account_id text;
  v_creator billing.creators;
begin
  if v_type = 'account.updated' then
    v_object := billing.require_stripe_object(p_event, 'account');
    v_account_id := v_object ->> 'id';
    if nullif(p_event ->> 'account', '') is distinct from v_account_id
      and nullif(p_event ->> 'account', '') is not null then
      return query select 'ignored'::text, format(
        'event of account %s describes another account, %s', p_event ->> 'account', v_account_id);
      return;
    end if;
  else
    -- data.object is the application (ca_...); the account is the event's.
    v_account_id := nullif(p_event ->> 'account', '');
  end if;

  select c.* into v_creator from billing.creators as c
  where c.stripe_account_id = v_account_id
  for no key update;
  if not found then
    return query select 'ignored'::text, format(
      'Stripe account %s is not a creator of this deployment', coalesce(v_account_id, 'null'));
    return;
  end if;
  if v_creator.account_event_created > v_created then
    return query select 'stale'::text, format(
      'account %s: an event newer than this one (%s) was already applied', v_account_id,
      v_created);
    return;
  end if;

  if v_type = 'account.application.deauthorized' then
    update billing.creators as c
    set
      charges_enabled = false,
      payouts_enabled = false,
      deauthorized_at = coalesce(c.deauthorized_at, v_created),
      account_event_created = v_created,
      updated_at = now()
    where c.user_id = v_creator.user_id;
    return query select 'applied'::text, format(
      'account %s of creator %s deauthorized the platform: no more sales or payouts',
      v_account_id, v_creator.user_id);
    return;
  end if;

  update billing.creators as c
  set
    charges_enabled = coalesce((v_object ->> 'charges_enabled')::boolean, false),
    payouts_enabled = coalesce((v_object ->> 'payouts_enabled')::boolean, false),
    details_submitted = coalesce((v_object ->> 'details_submitted')::boolean, false),
    requirements = case when jsonb_typeof(v_object -> 'requirements') = 'object'
      then v_object -> 'requirements' else '{}' end,
    account_event_created = v_created,
    updated_at = now()
  where c.user_id = v_creator.user_id;
  return query select 'applied'::text, format(
    'account %s of creator %s: charges_enabled %s, payouts_enabled %s', v_account_id,
    v_creator.user_id, coalesce((v_object ->> 'charges_enabled')::boolean, false),
    coalesce((v_object ->> 'payouts_enabled')::boolean, false));
end;
$$;

comment on function billing.apply_account_event(jsonb) is
'account.updated (keeps charges_enabled, payouts_enabled, details_submitted and requirements) and '
'account.application.deauthorized (ends sales and payouts) for a known creator; stale when an '
'event of the account with a later created was applied; ignored for an unknown account.';

revoke all on function billing.apply_account_event(jsonb) from public;

insert into billing.schema_migrations (version, name) values ('20261202800000', 'creators');
