-- Migration: what the HTTP service and the CLI read and write besides the ledger and events.
--
-- Purpose: the service reaches the database either as service_role over a direct connection or
-- through PostgREST with supabase-py `.rpc()`, where the billing schema is not exposed. So the
-- catalog, a user's billing profile (balance, plan, subscription, Stripe customer) and the Stripe
-- price of a product are functions in public, callable by service_role only.
-- Objects: public.list_products(), public.get_billing_profile(), public.set_product_stripe_price().

create function public.list_products(p_include_inactive boolean default false)
returns table (
  code text,
  kind text,
  name text,
  description text,
  tokens bigint,
  price_cents integer,
  currency text,
  stripe_price_id text,
  rollover boolean,
  active boolean,
  sort_order integer
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    p.code, p.kind, p.name, p.description, p.tokens, p.price_cents, p.currency,
    p.stripe_price_id, p.rollover, p.active, p.sort_order
  from billing.products as p
  where p.active or coalesce(p_include_inactive, false)
  order by p.sort_order, p.code;
$$;

comment on function public.list_products(boolean) is
'The catalog in display order: active products, or all with p_include_inactive. Security '
'invoker: service_role reads billing.products itself.';

revoke all on function public.list_products(boolean) from public, anon, authenticated;
grant execute on function public.list_products(boolean) to service_role;

create function public.get_billing_profile(p_user_id uuid)
returns table (
  balance bigint,
  available bigint,
  reserved bigint,
  plan text,
  subscription_status text,
  stripe_customer_id text
)
language sql stable
security invoker
set search_path = ''
as $$
  select
    a.balance,
    a.balance - a.reserved,
    a.reserved,
    a.plan,
    a.subscription_status,
    coalesce(
      -- The customer paying for the current (or latest) subscription: the portal must show it.
      (
        select s.stripe_customer_id
        from billing.subscriptions as s
        where s.user_id = a.user_id and s.stripe_customer_id is not null
        order by s.status in ('active', 'trialing', 'past_due') desc, s.updated_at desc, s.id
        limit 1
      ),
      -- Otherwise the first customer linked: the one the service created.
      (
        select c.stripe_customer_id
        from billing.customers as c
        where c.user_id = a.user_id
        order by c.created_at, c.stripe_customer_id
        limit 1
      )
    )
  from billing.accounts as a
  where a.user_id = p_user_id;
$$;

comment on function public.get_billing_profile(uuid) is
'The user''s balance, available and reserved tokens (as my_tokens() shows the user), plan, '
'subscription status and Stripe customer (of the current subscription, else the first linked; '
'null if none). No row when the user has no account. Security invoker.';

revoke all on function public.get_billing_profile(uuid) from public, anon, authenticated;
grant execute on function public.get_billing_profile(uuid) to service_role;

create function public.set_product_stripe_price(p_code text, p_stripe_price_id text)
returns table (status text)
language plpgsql
-- Definer: the caller (service_role) has no write privilege on billing tables by design.
security definer
set search_path = ''
as $$
begin
  if p_code is null then
    raise exception using errcode = '22023', message = 'p_code must not be null';
  end if;
  if p_stripe_price_id is null or p_stripe_price_id !~ '^price_[A-Za-z0-9_]{1,250}$' then
    raise exception using
      errcode = '22023',
      message = format('p_stripe_price_id must be a Stripe price id (price_...), got %s',
        coalesce(quote_literal(p_stripe_price_id), 'null'));
  end if;

  update billing.products as p
  set stripe_price_id = p_stripe_price_id, updated_at = now()
  where p.code = p_code and p.stripe_price_id is distinct from p_stripe_price_id;
  if found then
    return query select 'applied'::text;
  elsif exists (select 1 from billing.products as p where p.code = p_code) then
    return query select 'duplicate'::text;
  else
    return query select 'unknown_product'::text;
  end if;
end;
$$;

comment on function public.set_product_stripe_price(text, text) is
'Sets the Stripe price a product sells at (token-billing stripe sync-products). Statuses: '
'applied, duplicate (already set), unknown_product. 22023 on invalid arguments; 23505 if another '
'product has that price.';

revoke all on function public.set_product_stripe_price(text, text)
from public, anon, authenticated;
grant execute on function public.set_product_stripe_price(text, text) to service_role;

insert into billing.schema_migrations (version, name) values ('20261121001100', 'service_api');
