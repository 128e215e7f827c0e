-- Seed: the product catalog (token packs and plans), as in the contract.
--
-- Idempotent: running it again restores names, tokens and prices but never touches
-- stripe_price_id, which each deployment sets to its own Stripe prices (and tests set to theirs):
--   update billing.products set stripe_price_id = 'price_...' where code = 'starter';
-- The free plan exists already (migration 20261121000200_products.sql); it is upserted here so
-- the catalog reads in one place.

insert into billing.products as p (
  code, kind, name, description, tokens, price_cents, currency, rollover, active, sort_order
)
values
('pack_100', 'pack', '100 tokens', 'A one-off pack of 100 tokens.', 100, 500, 'usd', false, true, 10),
('pack_250', 'pack', '250 tokens', 'A one-off pack of 250 tokens.', 250, 1000, 'usd', false, true, 20),
('pack_600', 'pack', '600 tokens', 'A one-off pack of 600 tokens.', 600, 2000, 'usd', false, true, 30),
('free', 'plan', 'Free', 'Every new account: 100 tokens on signup.', 100, 0, 'usd', false, true, 0),
(
  'starter', 'plan', 'Starter', '5,000 tokens a month; unused tokens expire at the period end.',
  5000, 2900, 'usd', false, true, 40
),
(
  'pro', 'plan', 'Pro', '25,000 tokens a month; unused tokens expire at the period end.',
  25000, 9900, 'usd', false, true, 50
)
on conflict (code) do update
  set
    kind = excluded.kind,
    name = excluded.name,
    description = excluded.description,
    tokens = excluded.tokens,
    price_cents = excluded.price_cents,
    currency = excluded.currency,
    rollover = excluded.rollover,
    active = excluded.active,
    sort_order = excluded.sort_order,
    updated_at = now()
  where (
    p.kind, p.name, p.description, p.tokens, p.price_cents, p.currency, p.rollover, p.active,
    p.sort_order
  )
  is distinct from (
    excluded.kind, excluded.name, excluded.description, excluded.tokens,
    excluded.price_cents, excluded.currency, excluded.rollover, excluded.active, excluded.sort_order
  );
