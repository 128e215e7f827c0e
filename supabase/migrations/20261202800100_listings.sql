-- Migration: listings (agents creators sell) and entitlements (the agents a user bought).
--
-- Purpose: a creator's agent is a product of kind `agent`, owned by the creator
-- (products.creator_id), sold for a one-off price (price_cents: a Checkout Session, a
-- destination charge to the creator) and/or for tokens per run (products.tokens: what a run
-- costs; the creator earns a share of the tokens spent, 20261202800300_creator_earnings.sql).
-- Only a creator whose Stripe account has charges_enabled (and is not deauthorized) can list:
-- a trigger refuses an active listing of anyone else (TBLST). A paid sale grants the buyer an
-- entitlement, once per sale; a full refund or a lost dispute revokes it.
-- Objects: products kind agent, billing.products.creator_id, billing.tg_products__check_listing(),
--   billing.entitlements, public.upsert_listing(), public.list_listings(),
--   public.my_agents().

alter table billing.products
drop constraint products_kind_known,
add constraint products_kind_known check (kind in ('pack', 'plan', 'agent')),
drop constraint products_tokens_valid,
add constraint products_tokens_valid check (tokens > 0 or (kind in ('plan', 'agent') and tokens = 0)),
add column creator_id uuid references billing.creators (user_id),
add constraint products_agent_has_creator check ((kind = 'agent') = (creator_id is not null)),
add constraint products_agent_priced check (
  kind <> 'agent' or coalesce(price_cents, 0) > 0 or tokens > 0
);

create index products_creator_id_idx on billing.products (creator_id) where creator_id is not null;

comment on column billing.products.kind is
'pack: one-off purchase of tokens; plan: a subscription; agent: a creator''s listing.';
comment on column billing.products.tokens is
'Tokens granted per pack bought, or per billing period for a plan; for an agent, what one run '
'costs in tokens (0: not sold per run). Positive, except a plan or an agent may have 0.';
comment on column billing.products.creator_id is
'Agents only: the creator who sells it (billing.creators), paid through Stripe Connect.';

create function billing.tg_products__check_listing() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.active and (tg_op = 'INSERT' or not old.active or old.kind <> 'agent'
    or old.creator_id is distinct from new.creator_id) and not exists (
    select 1 from billing.creators as c
    where c.user_id = new.creator_id and c.charges_enabled and c.deauthorized_at is null
  ) then
    raise exception using
      errcode = 'TBLST',
      message = format('creator %s cannot list agent %s: its Stripe account does not have '
        'charges_enabled (finish onboarding first)', new.creator_id, new.code);
  end if;
  return new;
end;
$$;

comment on function billing.tg_products__check_listing() is
'Trigger: an agent becomes an active listing only for a creator with charges_enabled who has not '
'deauthorized the platform (TBLST otherwise).';

revoke all on function billing.tg_products__check_listing() from public;

create trigger tg_products__20_check_listing
before insert or update of kind, creator_id, active on billing.products
for each row when (new.kind = 'agent')
execute function billing.tg_products__check_listing();

-- Entitlements -------------------------------------------------------------------------------

create table billing.entitlements (
  id bigint generated always as identity primary key,
  user_id uuid not null references billing.accounts (user_id),
  product_code text not null references billing.products (code) on update cascade,
  sale_id text not null unique,
  granted_at timestamptz not null default now(),
  revoked_at timestamptz,
  revoked_reason text,
  constraint entitlements_revocation_explained check ((revoked_at is null) = (revoked_reason is null))
);

create unique index entitlements_one_active_idx on billing.entitlements (user_id, product_code)
where revoked_at is null;

comment on table billing.entitlements is
'The agents a user bought: one row per paid sale (sale_id unique: a sale grants once), at most '
'one unrevoked per user and agent. A full refund or a lost dispute sets revoked_at; nothing is '
'deleted.';
comment on column billing.entitlements.id is 'Entitlement id.';
comment on column billing.entitlements.user_id is 'The buyer.';
comment on column billing.entitlements.product_code is 'The agent (a product of kind agent).';
comment on column billing.entitlements.sale_id is 'The Checkout Session that sold it (cs_...).';
comment on column billing.entitlements.granted_at is 'Stripe''s time of the paid event.';
comment on column billing.entitlements.revoked_at is 'When a refund or a dispute took it back.';
comment on column billing.entitlements.revoked_reason is 'Why it was revoked.';

alter table billing.entitlements enable row level security;

create policy entitlements_select_own on billing.entitlements
for select to authenticated
using (user_id = (select auth.uid()));

revoke all on billing.entitlements from public, anon, authenticated, service_role;
grant select on billing.entitlements to authenticated, service_role;

create function public.my_agents()
returns table (product_code text, sale_id text, granted_at timestamptz, revoked_at timestamptz)
language sql stable
security invoker
set search_path = ''
as $$
  select e.product_code, e.sale_id, e.granted_at, e.revoked_at
  from billing.entitlements as e
  where e.user_id = (select auth.uid())
  order by e.granted_at desc, e.id desc
$$;

comment on function public.my_agents() is
'The agents the signed-in user bought (revoked ones too, with revoked_at), read through RLS.';

revoke all on function public.my_agents() from public, anon, authenticated;
grant execute on function public.my_agents() to authenticated;

-- Listing an agent ---------------------------------------------------------------------------

create function public.upsert_listing(
  p_creator_id uuid,
  p_code text,
  p_name text,
  p_price_cents integer default null,
  p_tokens_per_run bigint default 0,
  p_description text default null,
  p_currency text default 'usd',
  p_active boolean default true
) returns table (status text, code text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
declare
  v_existing billing.products;
begin
  if p_creator_id is null then
    raise exception using errcode = '22023', message = 'p_creator_id must not be null';
  end if;
  if p_code is null or p_code !~ '^[a-z0-9_]{1,64}$' then
    raise exception using
      errcode = '22023',
      message = format('p_code must be 1 to 64 of a-z, 0-9 and _, got %s',
        coalesce(quote_literal(p_code), 'null'));
  end if;
  if p_name is null or length(btrim(p_name)) not between 1 and 200 then
    raise exception using errcode = '22023', message = 'p_name must be 1 to 200 characters';
  end if;
  if p_price_cents is not null and p_price_cents not between 50 and 99999999 then
    raise exception using
      errcode = '22023',
      message = format('p_price_cents must be null or from 50 to 99999999, got %s', p_price_cents);
  end if;
  if p_tokens_per_run is null or p_tokens_per_run not between 0 and 1000000000 then
    raise exception using
      errcode = '22023',
      message = format('p_tokens_per_run must be from 0 to 10^9, got %s',
        coalesce(p_tokens_per_run::text, 'null'));
  end if;
  if p_price_cents is null and p_tokens_per_run = 0 then
    raise exception using
      errcode = '22023',
      message = 'a listing needs p_price_cents (a one-off price) or p_tokens_per_run (or both)';
  end if;
  if p_currency is null or p_currency !~ '^[a-z]{3}$' then
    raise exception using
      errcode = '22023',
      message = format('p_currency must be a lowercase ISO code, got %s',
        coalesce(quote_literal(p_currency), 'null'));
  end if;
  if not exists (select 1 from billing.creators as c where c.user_id = p_creator_id) then
    raise exception using
      errcode = 'TBLST',
      message = format('user %s is not a creator: onboard first (POST /v1/creators/onboard)',
        p_creator_id);
  end if;

  select p.* into v_existing from billing.products as p where p.code = p_code for update;
  if found and v_existing.creator_id is distinct from p_creator_id then
    raise exception using
      errcode = 'TBLST',
      message = format('product %s is not a listing of creator %s', p_code, p_creator_id);
  end if;
  if not found then
    insert into billing.products (
      code, kind, name, description, tokens, price_cents, currency, creator_id, active
    )
    values (
      p_code, 'agent', btrim(p_name), p_description, p_tokens_per_run, p_price_cents, p_currency,
      p_creator_id, coalesce(p_active, true)
    );
    return query select 'applied'::text, p_code;
    return;
  end if;
  if (v_existing.name, v_existing.description, v_existing.tokens, v_existing.price_cents,
      v_existing.currency, v_existing.active)
    is not distinct from (btrim(p_name), p_description, p_tokens_per_run, p_price_cents,
      p_currency, coalesce(p_active, true)) then
    return query select 'duplicate'::text, p_code;
    return;
  end if;
  update billing.products as p
  set
    name = btrim(p_name),
    description = p_description,
    tokens = p_tokens_per_run,
    price_cents = p_price_cents,
    currency = p_currency,
    active = coalesce(p_active, true),
    updated_at = now()
  where p.code = p_code;
  return query select 'updated'::text, p_code;
end;
$$;

comment on function public.upsert_listing(uuid, text, text, integer, bigint, text, text, boolean) is
'Creates or changes a creator''s agent listing: a one-off price in cents (50 or more) and/or a '
'price in tokens per run. Statuses: applied (new), updated, duplicate (unchanged). 22023 on '
'invalid arguments; TBLST when the user is not a creator, the code is another''s product, or the '
'creator''s account does not have charges_enabled (an active listing).';

revoke all on function public.upsert_listing(uuid, text, text, integer, bigint, text, text, boolean)
from public, anon, authenticated;
grant execute on function public.upsert_listing(uuid, text, text, integer, bigint, text, text, boolean)
to service_role;

create function public.list_listings(p_code text default null)
returns table (
  code text,
  name text,
  description text,
  price_cents integer,
  currency text,
  tokens_per_run bigint,
  creator_id uuid,
  stripe_account_id text,
  purchasable boolean
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    p.code, p.name, p.description, p.price_cents, p.currency, p.tokens, p.creator_id,
    c.stripe_account_id,
    p.price_cents is not null and c.charges_enabled and c.deauthorized_at is null
  from billing.products as p
  inner join billing.creators as c on c.user_id = p.creator_id
  where p.kind = 'agent' and p.active and (p_code is null or p.code = p_code)
  order by p.sort_order, p.code
$$;

comment on function public.list_listings(text) is
'Active agent listings (or the one named), with the creator''s account; purchasable when it has a '
'one-off price and the creator can take charges now. Security invoker: service_role reads the '
'tables itself.';

revoke all on function public.list_listings(text) from public, anon, authenticated;
grant execute on function public.list_listings(text) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202800100', 'listings');
