-- Migration: my_creator_earnings takes a limit and reads each entry once.
--
-- Purpose: GET /v1/creators/me shows a creator's latest 10 earnings entries, each with the
-- balance after it; my_creator_earnings() returned every entry (a window over the whole ledger
-- of the creator, sorted, every row sent to the service), and the service kept 10. Now the
-- latest p_limit entries are read newest first from the (creator_id, id) index, and the balance
-- after each is the creator's total less the entries after it: one sum over the creator's
-- entries, no window over them, p_limit rows sent. The same rows as before for the entries it
-- returns; p_limit null (the default) returns all of them.
-- Objects: replaces public.my_creator_earnings() by public.my_creator_earnings(integer).

drop function public.my_creator_earnings();

create function public.my_creator_earnings(p_limit integer default null)
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
    l.id, l.kind, l.amount_microcents,
    (t.total - coalesce(sum(l.amount_microcents) over (
      order by l.id desc rows between unbounded preceding and 1 preceding
    ), 0))::bigint,
    l.product_code, l.tokens, l.created_at
  from (
    select e.id, e.kind, e.amount_microcents, e.product_code, e.tokens, e.created_at
    from billing.creator_earnings as e
    where e.creator_id = (select auth.uid())
    order by e.id desc
    limit p_limit
  ) as l
  cross join (
    select coalesce(sum(e.amount_microcents), 0) as total
    from billing.creator_earnings as e
    where e.creator_id = (select auth.uid())
  ) as t
  order by l.id desc
$$;

comment on function public.my_creator_earnings(integer) is
'The signed-in creator''s earnings entries, newest first, at most p_limit (null: all), each with '
'the balance after it (in micro-cents: 10^6 a cent), read through RLS.';

revoke all on function public.my_creator_earnings(integer) from public, anon, authenticated;
grant execute on function public.my_creator_earnings(integer) to authenticated;

insert into billing.schema_migrations (version, name) values ('20261202900200', 'creator_earnings_limit');
