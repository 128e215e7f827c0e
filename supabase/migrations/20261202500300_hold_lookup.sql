-- Migration: a hold's owner and state, for the service's hold routes.
--
-- Purpose: POST /v1/holds/{id}/settle|release|extend act on a hold for the caller an API key
-- names; the service checks the hold is that user's first (another user's hold is answered as
-- not found), over either database path.
-- Objects: public.get_reservation().

create function public.get_reservation(p_reservation_id uuid)
returns table (user_id uuid, status text, amount bigint, expires_at timestamptz)
language sql stable
security invoker
set search_path = ''
as $$
  select r.user_id, r.status, r.amount, r.expires_at
  from billing.reservations as r
  where r.id = p_reservation_id
$$;

comment on function public.get_reservation(uuid) is
'One reservation''s user, status, amount and expiry (no row: no such reservation). Security '
'invoker: service_role reads billing.reservations itself.';

revoke all on function public.get_reservation(uuid) from public, anon, authenticated;
grant execute on function public.get_reservation(uuid) to service_role;

insert into billing.schema_migrations (version, name) values ('20261202500300', 'hold_lookup');
