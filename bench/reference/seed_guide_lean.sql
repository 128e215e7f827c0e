-- Second reference, labelled "lean rewrite" in the table: a LEANER rewrite of the seed guide's
-- deduct_tokens, written before the guide's own SQL was at hand (the bench's main reference is
-- now the guide itself, reference/seed_guide_token_billing.sql). Kept so the figures of earlier
-- runs stay comparable. The pattern that SaaS-monetization guides for Supabase hand out (a profiles row with a token count, a token_transactions table whose
-- event_id is unique, and a plpgsql function that locks, checks, updates, then inserts).
--
-- Provenance, stated plainly: the guide's own text could not be found in the searchable
-- corpora available to this project (web pages and public code searched for "supabase saas
-- monetization guide deduct_tokens for update event_id" and variants). What follows is the
-- canonical version of that pattern, written to match the brief of issue 5 step for step:
-- `select ... for update`, balance check, `update`, `insert` with a unique `event_id`. The many
-- public copies of the pattern that the search did return (profiles/user_tokens tables,
-- `select tokens into v_balance ... for update`, `raise exception 'Insufficient tokens'`, an
-- insert into token_transactions) differ from it only in names.
--
-- It lives in its own schema with its own tables, as the guide defines them, so the bench
-- compares designs, not table sizes. Loaded by bench/run.py into the bench database only.

create schema if not exists seed_guide_lean;

create table seed_guide_lean.profiles (
  id uuid primary key,
  tokens integer not null default 0,
  updated_at timestamptz not null default now()
);

create table seed_guide_lean.token_transactions (
  id uuid primary key default gen_random_uuid(),
  user_id uuid not null references seed_guide_lean.profiles (id),
  amount integer not null,
  type text not null,
  event_id text unique,
  created_at timestamptz not null default now()
);

create function seed_guide_lean.deduct_tokens(
  p_user_id uuid,
  p_amount integer,
  p_event_id text
) returns integer
language plpgsql
security definer
set search_path = seed_guide_lean, public
as $$
declare
  v_balance integer;
begin
  -- Lock the user's row so concurrent calls cannot both spend the same tokens.
  select tokens into v_balance
  from profiles
  where id = p_user_id
  for update;

  if v_balance is null then
    raise exception 'User not found';
  end if;

  if v_balance < p_amount then
    raise exception 'Insufficient tokens: need %, have %', p_amount, v_balance;
  end if;

  update profiles
  set tokens = tokens - p_amount, updated_at = now()
  where id = p_user_id;

  -- The unique event_id makes a retried request fail instead of charging twice.
  insert into token_transactions (user_id, amount, type, event_id)
  values (p_user_id, -p_amount, 'usage', p_event_id);

  return v_balance - p_amount;
end;
$$;

grant usage on schema seed_guide_lean to service_role;
grant execute on function seed_guide_lean.deduct_tokens(uuid, integer, text) to service_role;
