-- Migration: what a plan entitles its subscriber to, and for how long a late payment keeps it.
--
-- Purpose: a plan is more than a token count (the monetization guide's tiers): it carries limits
-- (`{"max_agents": 3}`; null = unlimited) and features (`{api_access, custom_agents}`), any key
-- the host defines. The account's entitlements follow its subscription state: active, trialing
-- and plans given without Stripe (status none) entitle; past_due keeps the plan's entitlements
-- for the plan's grace_period after the subscription went past_due (Stripe's time), then the
-- free plan's (the guide's "downgrade after grace period"); anything else is the free plan.
-- Objects: columns billing.products.limits, .features, .grace_period;
--   billing.accounts.past_due_since and its trigger tg_accounts__past_due_since;
--   public.my_entitlements(); public.check_entitlement();
--   public.check_limit().

alter table billing.products
add column limits jsonb not null default '{}',
add column features text[] not null default '{}',
add column grace_period interval not null default '7 days',
add constraint products_limits_valid check (
  jsonb_typeof(limits) = 'object'
  and not jsonb_path_exists(limits, '$.* ? (@.type() != "number" && @.type() != "null")')
),
add constraint products_grace_period_valid check (grace_period >= interval '0');

comment on column billing.products.limits is
'Plans: host-defined limits, name to a whole number (null: unlimited), e.g. {"max_agents": 3}. '
'A limit the plan does not name allows nothing (check_limit).';
comment on column billing.products.features is
'Plans: host-defined feature keys the plan includes, e.g. {api_access, custom_agents}.';
comment on column billing.products.grace_period is
'Plans: how long a past_due subscription keeps the plan''s entitlements, from when it went '
'past_due; then the account has the free plan''s until it is paid.';

-- The guide's free plan: one agent, the basic features. Only when nobody has set them yet.
update billing.products
set limits = '{"max_agents": 1}', features = '{basic}'
where code = 'free' and limits = '{}' and features = '{}';

alter table billing.accounts
add column past_due_since timestamptz;

comment on column billing.accounts.past_due_since is
'When subscription_status became past_due (the past_due subscription''s last Stripe event time); '
'null in any other status. The grace period runs from here.';

create function billing.tg_accounts__past_due_since() returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.subscription_status = 'past_due' and old.subscription_status is distinct from 'past_due' then
    new.past_due_since := coalesce(
      (
        select max(s.last_event_created) from billing.subscriptions as s
        where s.user_id = new.user_id and s.status = 'past_due'
      ),
      now());
  elsif new.subscription_status <> 'past_due' then
    new.past_due_since := null;
  end if;
  return new;
end;
$$;

comment on function billing.tg_accounts__past_due_since() is
'Keeps accounts.past_due_since: set when subscription_status becomes past_due, cleared when it '
'leaves it. Fires only on updates naming subscription_status (never on the usage path).';

revoke all on function billing.tg_accounts__past_due_since() from public;

create trigger tg_accounts__past_due_since
before update of subscription_status on billing.accounts
for each row execute function billing.tg_accounts__past_due_since();

create function public.my_entitlements(p_as_of timestamptz default now())
returns table (
  plan text,
  subscription_status text,
  entitled_plan text,
  limits jsonb,
  features text[],
  grace_until timestamptz,
  period_tokens bigint
)
language sql stable
security invoker
set search_path = ''
as $$
  select a.plan, a.subscription_status, e.plan, ep.limits, ep.features, e.grace_until, p.tokens
  from billing.accounts as a
  inner join billing.products as p on p.code = a.plan
  -- the entitled plan: the own plan, or past_due within the grace period; else free.
  cross join lateral (
    select
      case
        when a.subscription_status in ('none', 'active', 'trialing') then a.plan
        when a.subscription_status = 'past_due'
          and coalesce(p_as_of, now()) < coalesce(a.past_due_since, now()) + p.grace_period then a.plan
        else 'free'
      end as plan,
      case when a.subscription_status = 'past_due'
          then coalesce(a.past_due_since, now()) + p.grace_period end as grace_until
  ) as e
  inner join billing.products as ep on ep.code = e.plan
  where a.user_id = (select auth.uid());
$$;

comment on function public.my_entitlements(timestamptz) is
'The signed-in user''s plan, subscription status, the plan whose entitlements apply at p_as_of '
'(past_due: until grace_until, then free), its limits and features, and the own plan''s tokens '
'per period (what a low-balance warning is a share of). Security invoker: reads through RLS, so '
'no row for anyone else (or for anon).';

revoke all on function public.my_entitlements(timestamptz) from public, anon, service_role;
grant execute on function public.my_entitlements(timestamptz) to authenticated;

create function public.check_entitlement(
  p_user_id uuid,
  p_feature text,
  p_as_of timestamptz default now()
) returns table (allowed boolean, entitled_plan text, detail text)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_feature is null or length(btrim(p_feature)) = 0 then
    raise exception using errcode = '22023', message = 'p_feature must be a feature key, got null or blank';
  end if;
  return query
  select
    p_feature = any(ep.features), e.plan,
    format('%s %s %s%s', e.plan, case when p_feature = any(ep.features) then 'includes' else 'lacks' end,
      p_feature,
      case when e.plan <> a.plan then format(' (plan %s is %s)', a.plan, a.subscription_status) else '' end)
  from billing.accounts as a
  inner join billing.products as p on p.code = a.plan
  -- the entitled plan: the own plan, or past_due within the grace period; else free.
  cross join lateral (
    select
      case
        when a.subscription_status in ('none', 'active', 'trialing') then a.plan
        when a.subscription_status = 'past_due'
          and coalesce(p_as_of, now()) < coalesce(a.past_due_since, now()) + p.grace_period then a.plan
        else 'free'
      end as plan,
      case when a.subscription_status = 'past_due'
          then coalesce(a.past_due_since, now()) + p.grace_period end as grace_until
  ) as e
  inner join billing.products as ep on ep.code = e.plan
  where a.user_id = p_user_id;
  if not found then
    return query select false, null::text, 'unknown_account'::text;
  end if;
end;
$$;

comment on function public.check_entitlement(uuid, text, timestamptz) is
'Whether the user''s entitled plan at p_as_of includes feature p_feature (allowed), which plan '
'that is and why. Unknown account: not allowed, detail unknown_account. 22023 on a blank key.';

revoke all on function public.check_entitlement(uuid, text, timestamptz) from public, anon, authenticated;
grant execute on function public.check_entitlement(uuid, text, timestamptz) to service_role;

create function public.check_limit(
  p_user_id uuid,
  p_limit text,
  p_current bigint,
  p_as_of timestamptz default now()
) returns table (allowed boolean, max_value bigint, entitled_plan text, detail text)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_limit is null or length(btrim(p_limit)) = 0 then
    raise exception using errcode = '22023', message = 'p_limit must be a limit key, got null or blank';
  end if;
  if p_current is null or p_current < 0 then
    raise exception using
      errcode = '22023',
      message = format('p_current must be a count of 0 or more, got %s', coalesce(p_current::text, 'null'));
  end if;
  return query
  select
    case
      when not ep.limits ? p_limit then false
      when jsonb_typeof(ep.limits -> p_limit) = 'null' then true
      else p_current < floor((ep.limits ->> p_limit)::numeric)
    end,
    case when jsonb_typeof(ep.limits -> p_limit) = 'number'
        then floor((ep.limits ->> p_limit)::numeric)::bigint end,
    e.plan,
    case
      when not ep.limits ? p_limit then format('%s sets no %s: nothing allowed', e.plan, p_limit)
      when jsonb_typeof(ep.limits -> p_limit) = 'null' then format('%s: %s unlimited', e.plan, p_limit)
      else format('%s: %s %s of %s', e.plan, p_limit, p_current, ep.limits ->> p_limit)
    end
  from billing.accounts as a
  inner join billing.products as p on p.code = a.plan
  -- the entitled plan: the own plan, or past_due within the grace period; else free.
  cross join lateral (
    select
      case
        when a.subscription_status in ('none', 'active', 'trialing') then a.plan
        when a.subscription_status = 'past_due'
          and coalesce(p_as_of, now()) < coalesce(a.past_due_since, now()) + p.grace_period then a.plan
        else 'free'
      end as plan,
      case when a.subscription_status = 'past_due'
          then coalesce(a.past_due_since, now()) + p.grace_period end as grace_until
  ) as e
  inner join billing.products as ep on ep.code = e.plan
  where a.user_id = p_user_id;
  if not found then
    return query select false, null::bigint, null::text, 'unknown_account'::text;
  end if;
end;
$$;

comment on function public.check_limit(uuid, text, bigint, timestamptz) is
'Whether a user who has p_current of p_limit (e.g. 2 agents) may have one more under the plan '
'entitled at p_as_of: allowed when p_current < the limit (rounded down), always when the limit '
'is null (unlimited), never when the plan does not name it; max_value is the limit. Unknown '
'account: not allowed, detail unknown_account. 22023 on a blank key or a negative count.';

revoke all on function public.check_limit(uuid, text, bigint, timestamptz) from public, anon, authenticated;
grant execute on function public.check_limit(uuid, text, bigint, timestamptz) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202700000', 'plan_entitlements');
