-- Seed: an example product catalog (token packs and plans), as in the contract.
--
-- An example to copy into your own seed or run once: it inserts the products that are missing
-- and never changes one that exists, so running it again never resets what you edited (names,
-- tokens, prices, the Stripe price ids `token-billing stripe sync-products` stores). Edit the
-- catalog with updates, as the owner:
--   update billing.products set tokens = 6000 where code = 'starter';
-- The free plan exists already (migration 20261121000200_products.sql): every account starts on
-- it.

-- The guide's four tiers and its overage table (issue 17):
--   free        100 tokens, 1 agent, basic features; overage: block
--   starter     $29, 5,000 tokens, 3 agents; overage: throttle (up to 500 tokens a period, 2 s delay)
--   pro         $99 a month or $950 a year, 25,000 tokens, 10 agents, API access, custom agents;
--               overage: auto top-up (pack_600 when 20% is left, at most 3 a period)
--   enterprise  $499, 100,000 tokens included, unlimited agents, custom SLA; overage: postpaid
--               ($2.00 per 1,000 tokens beyond, invoiced after the period)
-- Every plan warns at 20% and 0% of its tokens (alert_thresholds). The free plan's limits,
-- features and thresholds are set by the migrations that add them.
insert into billing.products as p (
  code, kind, name, description, tokens, price_cents, currency, rollover, active, sort_order,
  limits, features, overage_strategy, overage_allowance, throttle_delay_ms, alert_thresholds,
  auto_top_up_pack, auto_top_up_below, auto_top_up_max_per_period, postpaid_unit_amount
)
values
(
  'pack_100', 'pack', '100 tokens', 'A one-off pack of 100 tokens.', 100, 500, 'usd', false, true, 10,
  '{}', '{}', 'block', 0, 0, '{}', null, null, 3, null
),
(
  'pack_250', 'pack', '250 tokens', 'A one-off pack of 250 tokens.', 250, 1000, 'usd', false, true, 20,
  '{}', '{}', 'block', 0, 0, '{}', null, null, 3, null
),
(
  'pack_600', 'pack', '600 tokens', 'A one-off pack of 600 tokens.', 600, 2000, 'usd', false, true, 30,
  '{}', '{}', 'block', 0, 0, '{}', null, null, 3, null
),
(
  'free', 'plan', 'Free', 'Every new account: 100 tokens on signup.', 100, 0, 'usd', false, true, 0,
  '{"max_agents": 1}', '{basic}', 'block', 0, 0, '{20, 0}', null, null, 3, null
),
(
  'starter', 'plan', 'Starter', '5,000 tokens a month; unused tokens expire at the period end.',
  5000, 2900, 'usd', false, true, 40,
  '{"max_agents": 3}', '{basic, file_upload, export}', 'throttle', 500, 2000, '{20, 0}', null, null, 3,
  null
),
(
  'pro', 'plan', 'Pro', '25,000 tokens a month; unused tokens expire at the period end.',
  25000, 9900, 'usd', false, true, 50,
  '{"max_agents": 10}', '{basic, file_upload, export, api_access, custom_agents}', 'auto_top_up', 0, 0,
  '{20, 0}', 'pack_600', 20, 3, null
),
(
  'enterprise', 'plan', 'Enterprise',
  '100,000 tokens a month included, unlimited beyond (invoiced after the period), custom SLA.',
  100000, 49900, 'usd', false, true, 60,
  '{"max_agents": null}', '{basic, file_upload, export, api_access, custom_agents, custom_sla}', 'postpaid',
  0, 0, '{20}', null, null, 3, 200
)
on conflict (code) do nothing;

-- Pro's annual price ($950 a year); its Stripe price is created by sync-products.
insert into billing.product_prices (product_code, billing_interval, currency, unit_amount)
values ('pro', 'year', 'usd', 95000)
on conflict (product_code, billing_interval, currency) do nothing;

-- Meters and example prices (rate cards, migration 20261202500000_rate_cards.sql). Inserted when
-- missing, never changed: a price is a version, so edit one by inserting a new version with a
-- later effective_from, e.g.
--   insert into billing.prices (meter_code, dimension_value, scheme, unit_amount, unit_divisor)
--   values ('llm.output_tokens', 'gpt-4o', 'per_unit', 8, 1000);
insert into billing.meters as m (code, unit, description, dimension)
values
('llm.input_tokens', 'token', 'Model input (prompt) tokens, priced per model.', 'model'),
('llm.output_tokens', 'token', 'Model output (completion) tokens, priced per model.', 'model'),
('agent.run', 'run', 'One agent run, whatever it used.', null),
('report.generated', 'report', 'One generated report.', null),
('api.call', 'call', 'One API call; graduated: cheaper after the first 1,000 in a period.', null)
on conflict (code) do nothing;

insert into billing.prices (
  meter_code, dimension_value, scheme, unit_amount, unit_divisor, rounding, tiers, minimum_tokens,
  effective_from, description
)
select
  v.meter_code,
  v.dimension_value,
  v.scheme,
  v.unit_amount,
  v.unit_divisor,
  'up' as rounding,
  v.tiers::jsonb,
  v.minimum_tokens,
  '2026-01-01 00:00:00+00' as effective_from,
  v.description
from (
  values
  ('llm.input_tokens', '*', 'per_unit', 25, 10000, null, 0, 'Any model: 2.5 tokens per 1K input tokens.'),
  ('llm.input_tokens', 'gpt-4o', 'per_unit', 25, 10000, null, 0, 'gpt-4o: 2.5 tokens per 1K input tokens.'),
  (
    'llm.input_tokens', 'gpt-4o-mini', 'per_unit', 15, 100000, null, 0,
    'gpt-4o-mini: 0.15 tokens per 1K input tokens.'
  ),
  ('llm.output_tokens', '*', 'per_unit', 10, 1000, null, 0, 'Any model: 10 tokens per 1K output tokens.'),
  ('llm.output_tokens', 'gpt-4o', 'per_unit', 10, 1000, null, 0, 'gpt-4o: 10 tokens per 1K output tokens.'),
  (
    'llm.output_tokens', 'gpt-4o-mini', 'per_unit', 6, 10000, null, 0,
    'gpt-4o-mini: 0.6 tokens per 1K output tokens.'
  ),
  ('agent.run', '*', 'per_unit', 5, 1, null, 0, '5 tokens per run.'),
  ('report.generated', '*', 'per_unit', 20, 1, null, 0, '20 tokens per report.'),
  (
    'api.call', '*', 'graduated', null, 1,
    '[{"up_to": 1000, "unit_amount": 10}, {"up_to": null, "unit_amount": 8}]', 0,
    '10 tokens per call for the first 1,000 calls of a period, 8 after.'
  )
) as v (meter_code, dimension_value, scheme, unit_amount, unit_divisor, tiers, minimum_tokens, description)
where not exists (
    select 1 from billing.prices as p
    where p.meter_code = v.meter_code and p.dimension_value = v.dimension_value and not p.custom
  );
