-- Seed: an example product catalog (token packs and plans), as in the contract.
--
-- An example to copy into your own seed or run once: it inserts the products that are missing
-- and never changes one that exists, so running it again never resets what you edited (names,
-- tokens, prices, the Stripe price ids `token-billing stripe sync-products` stores). Edit the
-- catalog with updates, as the owner:
--   update billing.products set tokens = 6000 where code = 'starter';
-- The free plan exists already (migration 20261121000200_products.sql): every account starts on
-- it.

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
on conflict (code) do nothing;
