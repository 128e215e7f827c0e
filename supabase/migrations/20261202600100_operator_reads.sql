-- Migration: what an operator reads about one user, and the parked Stripe events.
--
-- Purpose: `token-billing user <id|email>` and `token-billing events parked` answer "what does
-- this user have, and why" without SQL: the account, its holds, its live buckets with their
-- expiry, the newest entries, the Stripe links and the parked events that name the user. One
-- call reads it all in one snapshot, over DATABASE_URL and PostgREST alike.
-- Objects: public.describe_user(text), public.list_parked_stripe_events(integer).

create function public.describe_user(p_user text)
returns table (report jsonb)
language plpgsql stable
-- Definer: reading auth.users (the email lookup) and the private billing tables.
security definer
set search_path = ''
as $$
declare
  v_user_id uuid;
  v_email text;
  v_customers text[];
begin
  if p_user is null or length(p_user) not between 1 and 320 then
    raise exception 'p_user must be a user id or an email address'
      using errcode = '22023';
  end if;
  if p_user ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' then
    select u.id, u.email into v_user_id, v_email from auth.users as u where u.id = p_user::uuid;
  else
    select u.id, u.email into v_user_id, v_email
    from auth.users as u
    where lower(u.email) = lower(p_user)
    order by u.created_at
    limit 1;
  end if;
  if v_user_id is null then
    return;
  end if;
  select coalesce(array_agg(c.stripe_customer_id order by c.created_at), '{}') into v_customers
  from billing.customers as c
  where c.user_id = v_user_id;

  return query select jsonb_build_object(
    'user_id', v_user_id,
    'email', v_email,
    'account', (
      select to_jsonb(a) || jsonb_build_object('available', a.balance - a.reserved)
      from billing.accounts as a
      where a.user_id = v_user_id
    ),
    'holds', coalesce((
      select jsonb_agg(to_jsonb(r) order by r.created_at)
      from billing.reservations as r
      where r.user_id = v_user_id and r.status = 'pending'
    ), '[]'),
    'buckets', coalesce((
      select jsonb_agg(
        jsonb_build_object(
          'id', b.id, 'entry_id', b.entry_id, 'kind', e.kind, 'amount', b.amount,
          'remaining', b.remaining, 'expires_at', b.expires_at, 'created_at', b.created_at
        )
        order by b.expires_at nulls last, b.id
      )
      from billing.credit_buckets as b
      inner join billing.ledger_entries as e on e.id = b.entry_id
      where b.user_id = v_user_id and b.remaining > 0
    ), '[]'),
    'entries', coalesce((
      select jsonb_agg(x.entry order by x.id desc)
      from (
        select e.id, to_jsonb(e) as entry
        from billing.ledger_entries as e
        where e.user_id = v_user_id
        order by e.id desc
        limit 20
      ) as x
    ), '[]'),
    'stripe_customers', to_jsonb(v_customers),
    'subscriptions', coalesce((
      select jsonb_agg(to_jsonb(s) order by s.created_at desc)
      from billing.subscriptions as s
      where s.user_id = v_user_id
    ), '[]'),
    'payments', coalesce((
      select jsonb_agg(x.payment order by x.created_at desc)
      from (
        select p.created_at, to_jsonb(p) as payment
        from billing.stripe_payments as p
        where p.user_id = v_user_id
        order by p.created_at desc
        limit 20
      ) as x
    ), '[]'),
    -- Parked events are few (and indexed): the ones that name this user or a customer of theirs.
    'parked_events', coalesce((
      select jsonb_agg(
        jsonb_build_object(
          'id', e.id, 'type', e.type, 'created', e.created, 'attempts', e.attempts,
          'detail', e.detail
        )
        order by e.created, e.id
      )
      from billing.stripe_events as e
      where e.status = 'parked'
        and (
          strpos(e.payload::text, v_user_id::text) > 0
          or e.payload #>> '{data,object,customer}' = any(v_customers)
        )
    ), '[]')
  );
end;
$$;

comment on function public.describe_user(text) is
'One user as an operator sees them (p_user: the id or the email, case-insensitive): account '
'with available, pending holds, live buckets with expiry, the 20 newest entries, Stripe '
'customers, subscriptions, the 20 newest payments, and parked events naming the user. No row '
'for an unknown user. Service role only.';

revoke all on function public.describe_user(text) from public, anon, authenticated;
grant execute on function public.describe_user(text) to service_role;

create function public.list_parked_stripe_events(p_limit integer default 100)
returns table (
  event_id text,
  type text,
  created timestamptz,
  received_at timestamptz,
  attempts integer,
  detail text
)
language plpgsql stable
security invoker
set search_path = ''
as $$
begin
  if p_limit is null or p_limit not between 1 and 10000 then
    raise exception 'p_limit must be between 1 and 10000, got %', coalesce(p_limit::text, 'null')
      using errcode = '22023';
  end if;
  return query
  select e.id, e.type, e.created, e.received_at, e.attempts, e.detail
  from billing.stripe_events as e
  where e.status = 'parked'
  order by e.created, e.received_at, e.id
  limit p_limit;
end;
$$;

comment on function public.list_parked_stripe_events(integer) is
'The parked Stripe events, oldest first (at most p_limit, 1..10000), with why each waits: what '
'replay_parked_stripe_events() would try again. Service role only.';

revoke all on function public.list_parked_stripe_events(integer) from public, anon, authenticated;
grant execute on function public.list_parked_stripe_events(integer) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202600100', 'operator_reads');
