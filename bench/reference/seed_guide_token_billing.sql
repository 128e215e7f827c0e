-- Reference: the seed guide's token billing, statement for statement. The bench's main
-- reference: every "vs seed guide" ratio is against the deduct_tokens defined here.
--
-- Provenance: the SaaS monetization guide's token billing SQL, its "PostgreSQL Atomic Deduction",
-- "Token Addition" and "Database Schema" code blocks, in that order, copied verbatim from the
-- project's shared reference copy (seed_guide_token_billing.sql, outside this repository). The
-- part between the two "verbatim" markers below is that text, unchanged, byte for byte.
--
-- What was adapted to live in the bench database, and nothing else:
--   1. Its own schema, `seed_guide`: this file sets `search_path = seed_guide` before the
--      guide's statements, so their unqualified names create the objects there (the guide puts
--      them in the default schema, public, where our own public.deduct_tokens lives). The
--      functions keep the guide's unqualified names and no `set search_path` clause (adding one
--      would add a GUC switch per call the guide does not pay): pgbench sessions that call them
--      run with `search_path = seed_guide` (bench/run.py, PGOPTIONS), as the guide's callers
--      resolve them in public.
--   2. The guide alters an existing `users` table; the stand-in is `users (id uuid primary
--      key)`, created before the guide's statements (as the shared copy instructs).
--   3. Grants after the guide's statements: on Supabase, the default privileges of schema public
--      give service_role all rights on the tables and functions the guide creates there; the
--      grants below give the same on schema seed_guide. service_role bypasses RLS there as here.
-- Loaded by bench/run.py into the bench database only, as the migration owner (postgres).

create schema if not exists seed_guide;

set search_path = seed_guide;

create table users (id uuid primary key);

-- ---- verbatim from here -------------------------------------------------------------------
CREATE OR REPLACE FUNCTION deduct_tokens(
    p_user_id UUID,
    p_amount INTEGER,
    p_description TEXT,
    p_event_id TEXT DEFAULT NULL
) RETURNS TABLE(success BOOLEAN, remaining INTEGER, transaction_id UUID)
LANGUAGE plpgsql AS $$
DECLARE
    v_current_balance INTEGER;
    v_transaction_id UUID;
BEGIN
    -- Idempotency check (prevents duplicate deductions)
    IF p_event_id IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM token_transactions WHERE event_id = p_event_id) THEN
            RETURN QUERY
                SELECT true, (SELECT token_balance FROM users WHERE id = p_user_id),
                       (SELECT id FROM token_transactions WHERE event_id = p_event_id);
            RETURN;
        END IF;
    END IF;

    -- Lock the row and read balance atomically
    SELECT token_balance INTO v_current_balance
    FROM users WHERE id = p_user_id
    FOR UPDATE;

    -- Check sufficient balance
    IF v_current_balance IS NULL THEN
        RETURN QUERY SELECT false, 0, NULL::UUID;
        RETURN;
    END IF;

    IF v_current_balance < p_amount THEN
        RETURN QUERY SELECT false, v_current_balance, NULL::UUID;
        RETURN;
    END IF;

    -- Deduct
    UPDATE users
    SET token_balance = token_balance - p_amount
    WHERE id = p_user_id;

    -- Record transaction
    INSERT INTO token_transactions (user_id, amount, type, description, event_id)
    VALUES (p_user_id, -p_amount, 'deduction', p_description, p_event_id)
    RETURNING id INTO v_transaction_id;

    RETURN QUERY SELECT true, v_current_balance - p_amount, v_transaction_id;
END;
$$;

CREATE OR REPLACE FUNCTION add_tokens(
    p_user_id UUID,
    p_amount INTEGER,
    p_description TEXT,
    p_event_id TEXT DEFAULT NULL
) RETURNS TABLE(success BOOLEAN, new_balance INTEGER, transaction_id UUID)
LANGUAGE plpgsql AS $$
DECLARE
    v_transaction_id UUID;
    v_new_balance INTEGER;
BEGIN
    -- Idempotency check
    IF p_event_id IS NOT NULL THEN
        IF EXISTS (SELECT 1 FROM token_transactions WHERE event_id = p_event_id) THEN
            RETURN QUERY
                SELECT true, (SELECT token_balance FROM users WHERE id = p_user_id),
                       (SELECT id FROM token_transactions WHERE event_id = p_event_id);
            RETURN;
        END IF;
    END IF;

    -- Add tokens
    UPDATE users
    SET token_balance = token_balance + p_amount
    WHERE id = p_user_id
    RETURNING token_balance INTO v_new_balance;

    -- Record transaction
    INSERT INTO token_transactions (user_id, amount, type, description, event_id)
    VALUES (p_user_id, p_amount, 'purchase', p_description, p_event_id)
    RETURNING id INTO v_transaction_id;

    RETURN QUERY SELECT true, v_new_balance, v_transaction_id;
END;
$$;

-- Users with billing
ALTER TABLE users ADD COLUMN IF NOT EXISTS token_balance INTEGER DEFAULT 0;
ALTER TABLE users ADD COLUMN IF NOT EXISTS stripe_customer_id TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS stripe_subscription_id TEXT;
ALTER TABLE users ADD COLUMN IF NOT EXISTS subscription_tier TEXT DEFAULT 'free';

-- Token transactions
CREATE TABLE IF NOT EXISTS token_transactions (
    id UUID PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id UUID NOT NULL REFERENCES users(id),
    amount INTEGER NOT NULL,
    type TEXT NOT NULL CHECK (type IN ('purchase', 'deduction', 'bonus', 'refund')),
    description TEXT,
    event_id TEXT UNIQUE,  -- For idempotency
    created_at TIMESTAMPTZ DEFAULT now()
);

-- Indexes
CREATE INDEX idx_transactions_user ON token_transactions(user_id);
CREATE INDEX idx_transactions_created ON token_transactions(created_at);
CREATE INDEX idx_transactions_event ON token_transactions(event_id) WHERE event_id IS NOT NULL;

-- RLS
ALTER TABLE token_transactions ENABLE ROW LEVEL SECURITY;
CREATE POLICY "Users see own transactions" ON token_transactions
    FOR SELECT USING (auth.uid() = user_id);
-- ---- verbatim up to here ------------------------------------------------------------------

reset search_path;

grant usage on schema seed_guide to service_role;
grant all on all tables in schema seed_guide to service_role;
grant execute on all functions in schema seed_guide to service_role;
