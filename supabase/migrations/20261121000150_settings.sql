-- Migration: the install choices, kept in the database.
--
-- Purpose: what a team decides when it installs token-billing, in one row that installs and
-- upgrades never reset: the signup grant (0 allowed), whether users who already exist when
-- token-billing is installed get it, and whether anonymous users (Supabase anonymous sign-ins)
-- get it. The first install takes the values of these settings of the installing session, when
-- set (`token-billing install --signup-grant 0 --grant-existing-users` writes them into the
-- migration it makes), and the defaults otherwise:
--   token_billing.signup_grant           tokens each new account is credited (default 100)
--   token_billing.grant_existing_users   on: users that exist at install get the grant too
--                                        (default off: their accounts open with 0 tokens)
--   token_billing.grant_anonymous_users  on: anonymous users get the grant at signup (default
--                                        off: they get it once they link an email or phone)
-- Later changes are an update of the row, as the owner:
--   update billing.settings set signup_grant = 0;
-- Objects: billing.settings, billing.setting_bigint(), billing.setting_boolean().

create function billing.setting_bigint(p_name text, p_default bigint) returns bigint
language plpgsql stable
set search_path = ''
as $$
declare
  v_text text := nullif(btrim(pg_catalog.current_setting('token_billing.' || p_name, true)), '');
begin
  if v_text is null then
    return p_default;
  end if;
  if v_text !~ '^[0-9]{1,15}$' then
    raise exception using
      errcode = '22023',
      message = format('token_billing.%s must be an integer from 0 to 10^15, got %L', p_name, v_text);
  end if;
  return v_text::bigint;
end;
$$;

comment on function billing.setting_bigint(text, bigint) is
'The install choice token_billing.<p_name> of this session as a non-negative integer, or '
'p_default when unset; raises 22023 naming the setting for anything else.';

revoke all on function billing.setting_bigint(text, bigint) from public;

create function billing.setting_boolean(p_name text, p_default boolean) returns boolean
language plpgsql stable
set search_path = ''
as $$
declare
  v_text text := lower(nullif(btrim(pg_catalog.current_setting('token_billing.' || p_name, true)), ''));
begin
  if v_text is null then
    return p_default;
  end if;
  if v_text in ('on', 'true', 'yes', '1') then
    return true;
  end if;
  if v_text in ('off', 'false', 'no', '0') then
    return false;
  end if;
  raise exception using
    errcode = '22023',
    message = format('token_billing.%s must be on or off, got %L', p_name, v_text);
end;
$$;

comment on function billing.setting_boolean(text, boolean) is
'The install choice token_billing.<p_name> of this session as a boolean (on/off, true/false), or '
'p_default when unset; raises 22023 naming the setting for anything else.';

revoke all on function billing.setting_boolean(text, boolean) from public;

create table billing.settings (
  id boolean primary key default true,
  signup_grant bigint not null,
  grant_existing_users boolean not null,
  grant_anonymous_users boolean not null,
  updated_at timestamptz not null default now(),
  constraint settings_one_row check (id),
  constraint settings_signup_grant_valid check (signup_grant between 0 and 1000000000000000)
);

comment on table billing.settings is
'The install choices: one row, written at the first install, never reset by an install or '
'upgrade. The owner changes it with an update.';
comment on column billing.settings.id is 'Always true: the table has exactly one row.';
comment on column billing.settings.signup_grant is
'Tokens credited to each new account (kind signup, key signup:<user_id>, never expiring); 0: none.';
comment on column billing.settings.grant_existing_users is
'Whether users that existed when token-billing was installed were given the signup grant.';
comment on column billing.settings.grant_anonymous_users is
'Whether anonymous users (auth.users.is_anonymous) get the signup grant when they sign up; '
'otherwise they get it once, when they link an email or phone.';
comment on column billing.settings.updated_at is 'When the row was last changed.';

alter table billing.settings enable row level security;
-- No policy: service role only.
revoke all on billing.settings from public, anon, authenticated, service_role;
grant select on billing.settings to service_role;

insert into billing.settings (signup_grant, grant_existing_users, grant_anonymous_users)
values (
  billing.setting_bigint('signup_grant', 100),
  billing.setting_boolean('grant_existing_users', false),
  billing.setting_boolean('grant_anonymous_users', false)
)
on conflict (id) do nothing;

insert into billing.schema_migrations (version, name) values ('20261121000150', 'settings');
