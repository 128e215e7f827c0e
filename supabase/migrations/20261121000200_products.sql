-- Migration: the product catalog.
--
-- Purpose: what can be bought (token packs) or subscribed to (plans), how many tokens each
-- gives, and the Stripe price it is sold at. `supabase/seed.sql` fills it; the `free` plan is
-- created here because every account starts on it and the signup grant reads its tokens.
-- Objects: billing.products, the `free` plan row.

create table billing.products (
  code text primary key,
  kind text not null,
  name text not null,
  description text,
  tokens bigint not null,
  price_cents integer,
  currency text not null default 'usd',
  stripe_price_id text unique,
  rollover boolean not null default false,
  active boolean not null default true,
  sort_order integer not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint products_code_format check (code ~ '^[a-z0-9_]{1,64}$'),
  constraint products_kind_known check (kind in ('pack', 'plan')),
  constraint products_tokens_valid check (tokens > 0 or (kind = 'plan' and tokens = 0)),
  constraint products_price_valid check (price_cents is null or price_cents >= 0),
  constraint products_rollover_plans_only check (kind = 'plan' or not rollover)
);

comment on table billing.products is
'The catalog: token packs (bought once) and plans (subscribed). A product''s code is its stable '
'name in checkout metadata; Stripe prices map back to it through stripe_price_id.';
comment on column billing.products.code is 'Stable product code, e.g. pack_100 or pro; lowercase.';
comment on column billing.products.kind is 'pack: one-off purchase; plan: a subscription.';
comment on column billing.products.name is 'Display name.';
comment on column billing.products.description is 'Display description.';
comment on column billing.products.tokens is
'Tokens granted per pack bought, or per billing period for a plan. Positive, except a plan may '
'grant 0.';
comment on column billing.products.price_cents is 'Display price in the currency''s minor unit.';
comment on column billing.products.currency is 'ISO currency code of price_cents.';
comment on column billing.products.stripe_price_id is
'The Stripe price this product sells at; unique, so a paid line item maps to one product.';
comment on column billing.products.rollover is
'Plans only: true keeps unused period tokens; false (default) expires them at period end.';
comment on column billing.products.active is 'Inactive products cannot be bought.';
comment on column billing.products.sort_order is 'Display order in the catalog.';
comment on column billing.products.created_at is 'When the product was created.';
comment on column billing.products.updated_at is 'When the product was last changed.';

alter table billing.products enable row level security;

-- Signed-in users may read the active catalog; nobody writes it through the API.
create policy products_select_active on billing.products
for select to authenticated
using (active);

revoke all on billing.products from public, anon, authenticated, service_role;
grant select on billing.products to authenticated, service_role;

insert into billing.products (code, kind, name, description, tokens, price_cents, sort_order)
values ('free', 'plan', 'Free', 'Every new account: 100 tokens on signup.', 100, 0, 0)
on conflict (code) do nothing;

insert into billing.schema_migrations (version, name) values ('20261121000200', 'products');
